"""Profiling and benchmarking for `cmafnet bench` (SPEC §9, issue 8).

- ``timing``: device synchronisation, per-step time, batch-1 latency, peak memory, MACs, CUDA graphs,
  profiler tables.
- ``steps``: training steps (plain, SAM) built from a model, a loss function and an optimiser, and
  the breakdown of a step into its parts.
- ``models``: one model's bench (:class:`ModelBench` -> :func:`bench_model`).
- ``switches``: the fast-path switches flipped one at a time.
- ``data_path``: the real input path against pre-made tensors on a generated IDC-sized store.
- ``report``: ratios, targets and the printed table.

Nothing here imports the model, loss, training or data packages: the command (``cmafnet.cli.bench``)
wires CMAF-Net, its objective, the trainer's optimiser and SAM, and the data loader into these
generic pieces.
"""

from cmafnet.analysis.profiling.data_path import IDC_CLASS_COUNTS, IDC_SIZE, make_store, measure_data_path
from cmafnet.analysis.profiling.models import ModelBench, bench_model, make_inputs
from cmafnet.analysis.profiling.report import (
    TARGETS,
    check_targets,
    compute_ratios,
    count_errors,
    format_report,
)
from cmafnet.analysis.profiling.steps import (
    cross_entropy_loss,
    make_optimizer,
    make_train_step,
    step_breakdown,
)
from cmafnet.analysis.profiling.switches import run_switches
from cmafnet.analysis.profiling.timing import (
    Timing,
    cuda_graph_forward,
    latency_ms,
    profile_steps,
    time_per_step,
)

__all__ = [
    "IDC_CLASS_COUNTS", "IDC_SIZE", "TARGETS", "ModelBench", "Timing", "bench_model", "check_targets",
    "compute_ratios", "count_errors", "cross_entropy_loss", "cuda_graph_forward", "format_report",
    "latency_ms", "make_inputs", "make_optimizer", "make_store", "make_train_step", "measure_data_path",
    "profile_steps", "run_switches", "step_breakdown", "time_per_step",
]  # fmt: skip
