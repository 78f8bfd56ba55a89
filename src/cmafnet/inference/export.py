"""Export the plain inference path (normalised image -> class probabilities) to ONNX or TorchScript.

The exported graph takes the *preprocessed* input ``(B, 3, S, S)`` float (ImageNet mean/std at the
model's ``img_size``, i.e. what ``GPUPreprocess(train=False)`` produces) and returns softmax
probabilities ``(B, C)``; the batch axis is dynamic. After export the file is reloaded and compared
with PyTorch on CPU (onnxruntime for ONNX): the maximum absolute difference of the probabilities must
be at most ``tolerance`` (1e-4), otherwise :class:`ParityError` is raised.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cmafnet.errors import CmafnetError, ConfigError
from cmafnet.run import load_run, write_json

log = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript")
DEFAULT_TOLERANCE = 1e-4
MIN_OPSET = 18  # torch's dynamo exporter implements opset 18 and later


class ParityError(CmafnetError):
    """The exported model's probabilities differ from PyTorch's by more than the tolerance."""


@dataclass
class ExportResult:
    path: Path
    format: str
    max_abs_diff: float
    tolerance: float
    batch_sizes: tuple[int, ...]
    opset: int | None = None

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance


# Library loggers that print INFO lines for every exporter pass; shown only with ``cmafnet -v``.
_CHATTY_LOGGERS = ("onnx", "onnx_ir", "onnxscript", "torch.onnx", "torch.export", "torch._export")


@contextlib.contextmanager
def _quiet_exporters() -> Iterator[None]:
    """Exporter chatter (deprecations, onnxscript notes, per-pass INFO logs) off unless debugging."""
    if log.isEnabledFor(logging.DEBUG):
        yield
        return
    loggers = [logging.getLogger(name) for name in _CHATTY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _export_onnx(wrapper: nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    batch = torch.export.Dim("batch", min=1, max=4096)
    with _quiet_exporters():
        prog = torch.onnx.export(
            wrapper, (example,), dynamo=True, input_names=["input"], output_names=["probs"],
            dynamic_shapes={"input": {0: batch}}, opset_version=opset, external_data=False, verbose=False,
        )  # fmt: skip
    prog.save(str(path))
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    written = next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if written != opset:  # the sidecar must never record an opset the file does not have
        raise CmafnetError(f"the exporter wrote opset {written} instead of the requested {opset}")


def _exported_probs(fmt: str, path: Path, x: torch.Tensor) -> np.ndarray:
    """Probabilities of the exported file for ``x`` (onnxruntime CPU, or TorchScript)."""
    if fmt == "onnx":
        import onnxruntime as ort

        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        loaded = torch.jit.load(str(path), map_location="cpu").eval()
    with torch.inference_mode():
        return loaded(x).numpy()


def _check_args(fmt: str, opset: int, tolerance: float) -> None:
    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {FORMATS}, got {fmt!r}")
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ConfigError(f"--tolerance must be a number >= 0, got {tolerance}")
    if fmt == "onnx":
        missing = [m for m in ("onnx", "onnxruntime", "onnxscript") if importlib.util.find_spec(m) is None]
        if missing:
            raise ConfigError(
                f"ONNX export needs {', '.join(missing)}: pip install 'cmafnet[export]' (or -e '.[export]')"
            )
        import onnx.defs

        newest = int(onnx.defs.onnx_opset_version())  # torch's minimum to the installed onnx's newest
        if not MIN_OPSET <= opset <= newest:
            raise ConfigError(f"--opset {opset}: the ONNX exporter writes opsets {MIN_OPSET} to {newest}")


def export_model(
    model: nn.Module,
    img_size: int,
    out: str | Path,
    fmt: str = "onnx",
    *,
    opset: int = 18,
    tolerance: float = DEFAULT_TOLERANCE,
) -> ExportResult:
    """Export ``model`` (CPU, eval) and check parity on random inputs at batch sizes 1 and 3.

    The file is written under a temporary name and renamed when the export and the parity run
    finished (a failed export leaves nothing; a failed parity check keeps the file to inspect).

    Raises:
        CmafnetError: the exporter failed (message says which stage).
        ParityError: the reloaded model disagrees with PyTorch by more than ``tolerance``.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    wrapper = nn.Sequential(model.cpu(), nn.Softmax(dim=1)).eval()  # logits -> probabilities (B, C)
    gen = torch.Generator().manual_seed(0)
    # Inputs in the normalised range the model sees (roughly N(0, 1) per channel).
    examples = [torch.randn(b, 3, img_size, img_size, generator=gen) for b in (1, 3)]
    with torch.inference_mode():
        refs = [wrapper(x).numpy() for x in examples]
    tmp = out.with_name(f".{out.name}.partial")
    try:
        try:
            if fmt == "onnx":
                _export_onnx(wrapper, examples[-1], tmp, opset)
            else:
                with torch.no_grad(), warnings.catch_warnings():
                    # torch.jit is deprecated but still shipped
                    warnings.simplefilter("ignore", FutureWarning)
                    scripted = torch.jit.trace(wrapper, examples[-1], check_trace=False)
                scripted.save(str(tmp))
        except CmafnetError:
            raise
        except Exception as err:
            raise CmafnetError(
                f"{fmt} export failed: {type(err).__name__}: {str(err).splitlines()[0][:500]}"
            ) from err
        diffs = []
        for x, ref in zip(examples, refs):
            got = _exported_probs(fmt, tmp, x)
            if got.shape != ref.shape:
                raise ParityError(
                    f"exported model returned shape {got.shape} for input batch {x.shape[0]}, expected {ref.shape}"
                )
            diffs.append(float(np.abs(got - ref).max()))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, out)
    return ExportResult(out, fmt, max(diffs), tolerance, (1, 3), opset if fmt == "onnx" else None)


def export_run(
    run_dir: str | Path,
    fmt: str = "onnx",
    out: str | Path | None = None,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    opset: int = 18,
) -> ExportResult:
    """Export a run folder's model; writes ``<out>`` and ``<out>.json`` (classes, img_size, mean/std,
    threshold, parity).

    Raises:
        ConfigError: unknown format, an opset the exporter cannot write, a negative tolerance.
        ParityError: the parity check failed (the file is kept for inspection).
    """
    from cmafnet.data.safety import check_output_file
    from cmafnet.data.transforms import input_normalization
    from cmafnet.inference.predict import run_classes, run_threshold

    _check_args(fmt, opset, tolerance)  # before any work
    suffix = ".onnx" if fmt == "onnx" else ".pt"
    out = check_output_file(
        out if out is not None else Path(run_dir) / f"model{suffix}", "--out", f"model{suffix}"
    )
    run = load_run(run_dir, device="cpu")
    img_size = run.config.model.img_size
    res = export_model(run.model, img_size, out, fmt, opset=opset, tolerance=tolerance)
    threshold, source = run_threshold(run.meta)
    mean, std = input_normalization(run.config.data)
    sidecar = {
        "format": fmt, "input": {"name": "input", "shape": ["batch", 3, img_size, img_size],
        "dtype": "float32", "mean": list(mean), "std": list(std),
        "stain_normalisation": run.config.data.stain.model_dump(), "stain_reference": run.meta.get("stain_reference")},
        "output": {"name": "probs", "classes": run_classes(run)}, "threshold": threshold,
        "threshold_source": source, "parity": {"max_abs_diff": res.max_abs_diff, "tolerance": tolerance,
        "batch_sizes": list(res.batch_sizes), "passed": res.passed}, "opset": res.opset,
    }  # fmt: skip
    write_json(out.with_name(out.name + ".json"), sidecar)
    if not res.passed:
        raise ParityError(
            f"{out}: parity check FAILED: max |p_export - p_torch| = {res.max_abs_diff:.3g} > {tolerance:g}"
        )
    log.info("exported %s (%s), parity max abs diff %.3g", out, fmt, res.max_abs_diff)
    return res
