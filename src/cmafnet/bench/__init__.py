"""`cmafnet bench`: speed of CMAF-Net against timm references and a naive dual-branch model, in one process.

- ``timing``: device synchronisation, per-step time, batch-1 latency, peak memory, MACs, CUDA graphs,
  profiler tables.
- ``suite``: what is measured: CMAF-Net through the trainer's own stage step
  (:func:`cmafnet.training.prepare_stage`, so the bench times exactly what ``cmafnet train`` runs),
  the references, their variants, and the real input path.
- ``steps``: the references' plain cross-entropy step and the breakdown of a step into its parts.
- ``models``: one model's bench (:class:`ModelBench` -> :func:`bench_model`).
- ``switches``: the fast-path switches flipped one at a time.
- ``data_path``: the real input path against pre-made tensors on a generated IDC-sized store.
- ``naive``: the naive ResNet-18 + MobileViT + cross-attention reference of the GPU anchors.
- ``report``: ratios, targets and the printed table.

The package sits above :mod:`cmafnet.training` (it imports the trainer; the trainer never imports it).
"""

from cmafnet.bench.data_path import IDC_CLASS_COUNTS, IDC_SIZE, make_store, measure_data_path
from cmafnet.bench.models import ModelBench, bench_model, make_inputs
from cmafnet.bench.steps import cross_entropy_loss, make_optimizer, plain_ce_step, step_breakdown
from cmafnet.bench.suite import trainer_parts
from cmafnet.bench.switches import run_switches
from cmafnet.bench.targets import TARGETS, check_targets, compute_ratios, count_errors, format_report
from cmafnet.bench.timing import Timing, cuda_graph_forward, latency_ms, profile_steps, time_per_step

__all__ = [
    "IDC_CLASS_COUNTS", "IDC_SIZE", "TARGETS", "ModelBench", "Timing", "bench_model", "check_targets",
    "compute_ratios", "count_errors", "cross_entropy_loss", "cuda_graph_forward", "format_report",
    "latency_ms", "make_inputs", "make_optimizer", "make_store", "measure_data_path", "plain_ce_step",
    "profile_steps", "run_switches", "step_breakdown", "time_per_step", "trainer_parts",
]  # fmt: skip
