"""The run folder's running records: ``metrics.csv``, ``run.json`` meta fields, TensorBoard scalars."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cmafnet import run
from cmafnet.config import TrainConfig
from cmafnet.devices import device_name
from cmafnet.errors import ConfigError
from cmafnet.training import distributed as distr

if TYPE_CHECKING:
    from cmafnet.training.progress import Progress


# What a run records it cost, per stage and in total. ``passes``: forward/backward passes over a batch
# (a SAM step makes two); ``macs``: forward MACs per image x images x passes x 3 (a backward pass is
# counted as twice a forward one, the usual convention), so a SAM step costs twice a plain one.
COST_KEYS = ("steps", "images", "passes", "macs", "seconds")
COST_CONVENTION = (
    "training MACs = forward MACs per image x images x passes x 3 (forward + backward); SAM: 2 passes"
)


def step_macs(macs_per_image: float, images: int, passes: int) -> float:
    """Training MACs of one optimiser step (COST_CONVENTION): forward x images x passes x 3."""
    return macs_per_image * images * passes * 3


def step_passes(sam_rho: float | None) -> int:
    """Forward/backward passes per step: two with SAM (a positive ``rho``), else one."""
    return 2 if sam_rho else 1


def add_step_cost(
    p: Progress, stage: str, *, images: int, passes: int, macs_per_image: int, seconds: float
) -> None:
    """Account one optimiser step of ``stage`` (its images, passes, MACs and seconds)."""
    c = p.stage_cost.setdefault(stage, dict.fromkeys(COST_KEYS, 0))
    c["steps"] += 1
    c["images"] += images
    c["passes"] += passes
    c["macs"] += step_macs(macs_per_image, images, passes)
    c["seconds"] += seconds


def total_cost(p: Progress) -> dict[str, float]:
    """The stages' costs summed, plus a probe's feature extraction (its MACs and seconds)."""
    total = {k: sum(c[k] for c in p.stage_cost.values()) for k in COST_KEYS}
    for k in ("macs", "seconds"):
        total[k] += p.extraction.get(k, 0)
    return total


def stage_throughput(p: Progress) -> dict[str, dict[str, float]]:
    """Mean training throughput per stage: img/s and ms per step, with the images, seconds and steps they
    come from (validation excluded, the data path included)."""
    res = {}
    for name, c in p.stage_cost.items():
        images, seconds, steps = c["images"], c["seconds"], c["steps"]
        res[name] = {
            "img_s": round(images / seconds, 2) if seconds > 0 else None,
            "step_ms": round(1e3 * seconds / steps, 3) if steps else None,
            "images": images, "seconds": round(seconds, 4), "steps": steps,
        }  # fmt: skip
    return res


def cost_record(p: Progress, device: str) -> dict:
    """run.json's ``cost``: per stage and in total, with the device and the counting convention."""
    rounded = lambda c: {**c, "seconds": round(c["seconds"], 3)}  # noqa: E731
    return {
        "stages": {k: rounded(c) for k, c in p.stage_cost.items()}, "total": rounded(total_cost(p)),
        "macs_per_image": p.macs_per_image, "device": device, "convention": COST_CONVENTION,
        "extraction": p.extraction or None,  # a probe's embeddings, included in total (training.probe_data)
    }  # fmt: skip


class RunRecords:
    """Writes what a run has done so far; only the main rank writes."""

    def __init__(self, out: Path, info: distr.DistInfo, tc: TrainConfig) -> None:
        self.out, self.info, self.tc = out, info, tc
        self.device = device_name(info.device)
        self._tb: Any = None  # SummaryWriter, created on first use

    def write_metrics(self, rows: list[dict]) -> None:
        """All epoch rows so far as ``metrics.csv`` (atomically replaced)."""
        import pandas as pd

        run.atomic_write_bytes(self.out / run.METRICS_FILE, pd.DataFrame(rows).to_csv(index=False).encode())

    def write_meta(self, p: Progress, **fields: Any) -> None:
        """The progress fields of ``run.json`` plus ``fields`` (e.g. ``status``)."""
        if not self.info.is_main:
            return
        best = p.best_metric if math.isfinite(p.best_metric) else None
        run.update_meta(
            self.out, best_epoch=p.best_epoch if best is not None else None, best_metric=best,
            best_metric_name="val_auprc", global_step=p.global_step, epochs_done=p.global_epoch,
            nonfinite_steps=p.nonfinite_total, stage_throughput=stage_throughput(p),
            cost=cost_record(p, self.device), **fields,
        )  # fmt: skip

    def log_tensorboard(self, row: dict) -> None:
        """The row's numbers as TensorBoard scalars at its epoch (``train.tensorboard``)."""
        if not self.tc.tensorboard:
            return
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError(
                    "train.tensorboard: install the extra: pip install 'cmafnet[tensorboard]'"
                ) from None
            self._tb = SummaryWriter(str(self.out / "tensorboard"))
        for k, v in row.items():
            if isinstance(v, (int, float)) and k not in ("epoch", "stage"):
                self._tb.add_scalar(k, v, row["epoch"])
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
