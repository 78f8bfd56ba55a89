"""Rough GPU cost of each table at paper scale, from measured throughputs.

``cmafnet experiment --list --calibrate RUN_DIR`` replaces the assumed training throughput of a run's
model with what that run measured (``run.json`` ``stage_throughput``: images per second of each stage's
optimiser steps with their data path), stage by stage for rows whose stages it measured.

Assumptions otherwise (printed by ``cmafnet experiment --list``):

* throughputs: a file named by ``CMAFNET_GPU_ANCHOR`` (anchor JSON: one GPU, bf16, eager, 224 px, batch 128) when
  present, else the copy of those numbers below; models without an anchor are estimated from their
  parts (TransFuse ~ ResNet-50 + DeiT-S in series, MMTM ~ ResNet-18 + DeiT-S, HRFNet ~ 0.7 x
  ResNet-50); CMAF-Net ~ the naive ResNet-18 + MobileViT-S + cross-attention proxy at half speed
  because SAM does two forward/backward passes per step;
* every run goes the full 100 epochs (early stopping can only make it cheaper), one validation pass
  per epoch, one test pass; data loading hidden behind compute;
* a baseline at CMAF-Net's compute (``--match-compute``) trains CMAF-Net's training MACs (its stages'
  epochs x 2 SAM passes x its forward MACs) at its own forward MACs (``GMACS_224``) and speed;
* IDC: 277,524 patches, 28.4% IDC-positive, patient split 70/10/20 -> 194,267 train / 27,752 val /
  55,505 test; controlled ratios undersample the training minority only; BreakHis: 7,909 images.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from cmafnet.config import load_config, parse_ratio
from cmafnet.data.datasets import IDC, BreakHis
from cmafnet.errors import RunFolderError
from cmafnet.experiments.spec import RunSpec

# (train img/s, infer img/s) on one H200 from gpu_anchor_h200.json, used when the file is absent.
_FALLBACK = {
    "resnet18": (10054, 40094),
    "resnet50": (4031, 15718),
    "densenet121": (1841, 9599),
    "efficientnet_b3": (1848, 11300),
    "convnext_tiny": (2803, 8372),
    "vit_small_patch16_224": (3751, 21039),
    "swin_tiny_patch4_window7_224": (1940, 5866),
    "deit_small_patch16_224": (3417, 21002),
    "dual_proxy_s": (2148, 6467),
}
# registry names whose timm anchor is named otherwise (the rest share their name)
_TIMM = {
    "vit_s16": "vit_small_patch16_224",
    "swin_t": "swin_tiny_patch4_window7_224",
    "deit_s": "deit_small_patch16_224",
}
# Forward GMACs per image at 224 px of each model in its paper config (models.complexity.forward_macs; a
# slow test checks them): what a compute-matched baseline's epochs are derived from.
GMACS_224 = {
    "resnet18": 1.814, "resnet50": 4.087, "densenet121": 2.833, "efficientnet_b3": 0.961,
    "convnext_tiny": 4.455, "vit_s16": 4.598, "swin_t": 4.490, "deit_s": 4.598, "transfuse": 8.742,
    "hrfnet": 4.560, "mmtm": 6.413, "cmafnet": 3.398,
}  # fmt: skip
IDC_TOTAL, BREAKHIS_TOTAL = IDC.PUBLISHED["images"], BreakHis.PUBLISHED["images"]  # data.datasets: one home
IDC_POS_FRAC = IDC.PUBLISHED["per_class"]["IDC"] / IDC_TOTAL
EPOCHS = 100
PROFILE_S = 120.0  # Table 8: about two minutes of benchmarking per model


def anchor_rates(path: str | Path | None = None) -> tuple[dict[str, tuple[float, float]], str]:
    """Anchor (train, infer) img/s per model name, and where they came from."""
    # An explicit file, or CMAFNET_GPU_ANCHOR (e.g. your own `cmafnet bench`-style anchor JSON);
    # otherwise the built-in copy of the published H200 anchors.
    c = path or os.environ.get("CMAFNET_GPU_ANCHOR")
    if c and Path(c).exists():
        doc = json.loads(Path(c).read_text())
        rates = {
            k: (float(v["train_img_s"]), float(v["infer_img_s"]))
            for k, v in doc.items()
            if isinstance(v, dict) and "train_img_s" in v and "infer_img_s" in v
        }
        return rates, f"{c} ({doc.get('gpu', '?')})"
    return dict(_FALLBACK), "built-in copy of the H200 anchors"


def _series(*rates: tuple[float, float]) -> tuple[float, float]:
    """Throughput of models run one after the other on the same images."""
    return tuple(1.0 / sum(1.0 / r[i] for r in rates) for i in (0, 1))  # type: ignore[return-value]


def method_rate(model: str, rates: dict[str, tuple[float, float]]) -> tuple[float, float]:
    """(train, infer) img/s estimate for a registry model name."""
    r = {**_FALLBACK, **rates}
    if model in _TIMM or model in _FALLBACK:
        return r[_TIMM.get(model, model)]
    if model == "transfuse":
        return _series(r["resnet50"], r["deit_small_patch16_224"])
    if model == "mmtm":
        return _series(r["resnet18"], r["deit_small_patch16_224"])
    if model == "hrfnet":
        return (0.7 * r["resnet50"][0], 0.7 * r["resnet50"][1])
    tr, inf = r["dual_proxy_s"]  # cmafnet
    return (tr / 2.0, inf)


@dataclass(frozen=True)
class Calibration:
    """Training throughput a run measured: img/s per stage name and over all its stages."""

    model: str
    stage_img_s: dict[str, float]
    mean_img_s: float
    device: str
    img_size: int
    source: str

    def describe(self) -> str:
        stages = ", ".join(f"{k} {v:,.0f}" for k, v in self.stage_img_s.items())
        return f"{self.model}: {stages} img/s ({self.device}, {self.img_size} px; {self.source})"


def load_calibration(run_dir: str | Path) -> Calibration:
    """The measured per-stage training throughput of a run folder (``cmafnet train`` records it).

    Raises:
        RunFolderError: no run.json, or a run that finished no epoch (nothing measured).
    """
    from cmafnet.run import read_meta

    meta = read_meta(run_dir)
    speed = {k: v for k, v in (meta.get("stage_throughput") or {}).items() if v.get("img_s")}
    if not speed:
        raise RunFolderError(
            f"--calibrate {run_dir}: the run records no training throughput (no epoch finished)"
        )
    images = sum(v["images"] for v in speed.values())
    seconds = sum(v["seconds"] for v in speed.values())
    return Calibration(
        model=str(meta.get("model", "cmafnet")), stage_img_s={k: float(v["img_s"]) for k, v in speed.items()},
        mean_img_s=images / seconds, device=str(meta.get("device", "?")), img_size=int(meta.get("img_size", 0)),
        source=str(run_dir),
    )  # fmt: skip


@cache
def _schedule(base: str, overrides: tuple[str, ...]) -> tuple[tuple[tuple[str, int], ...], int]:
    """A config's ``(stage name, epochs)`` and forward/backward passes per step (2 under SAM)."""
    train = load_config(base, list(overrides)).train
    passes = 2 if train.sam.enabled and train.sam.rho > 0 else 1
    return tuple((st.name, st.epochs) for st in train.stages), passes


def _model(spec: RunSpec) -> str:
    return next((o.split("=", 1)[1] for o in spec.overrides if o.startswith("model.name=")), "cmafnet")


def matched_epochs(spec: RunSpec, reference: RunSpec) -> float:
    """Epochs a compute-matched baseline trains: its reference's training MACs (every epoch of every stage,
    x 2 passes under SAM, at the reference's forward MACs) over the MACs of one of its own epochs."""
    ref_stages, ref_passes = _schedule(reference.base, reference.overrides)
    ref_macs = sum(e for _, e in ref_stages) * ref_passes * GMACS_224[_model(reference)]
    return ref_macs / (_schedule(spec.base, spec.overrides)[1] * GMACS_224[_model(spec)])


def _idc_sizes(ratio: str | None) -> tuple[float, float, float]:
    train, val, test = 0.7 * IDC_TOTAL, 0.1 * IDC_TOTAL, 0.2 * IDC_TOTAL
    if ratio:
        maj, mino = parse_ratio(ratio)
        n0 = train * (1 - IDC_POS_FRAC)
        n1 = min(train * IDC_POS_FRAC, n0 * mino / maj)
        train = n0 + n1
    return train, val, test


def run_seconds(
    spec: RunSpec,
    rates: dict[str, tuple[float, float]],
    calib: dict[str, Calibration] | None = None,
    reference: RunSpec | None = None,
) -> float:
    """Estimated seconds of one run on one GPU (paper scale); ``calib`` maps model names to measured
    training throughputs (:func:`load_calibration`); ``reference``: the run a compute-matched run
    (``spec.match``) takes its training MACs from."""
    if spec.evaluation == "profile":
        return PROFILE_S
    model = _model(spec)
    tr, inf = method_rate(model, rates)
    if spec.dataset == "breakhis":
        train, val, test = (f * BREAKHIS_TOTAL for f in (0.7, 0.1, 0.2))
    else:
        train, val, test = _idc_sizes(spec.column)
    extra = BREAKHIS_TOTAL / inf if spec.evaluation == "zeroshot" else 0.0
    epochs = None
    if spec.match is not None:
        if reference is None or reference.run_id != spec.match:
            raise ValueError(
                f"{spec.run_id}: the cost of a compute-matched run needs its reference {spec.match}"
            )
        epochs = matched_epochs(spec, reference)
    c = (calib or {}).get(model)
    if epochs is not None:  # one stage of the matched length
        train_s = epochs * train / (tr if c is None else c.mean_img_s)
    elif c is None:
        train_s = EPOCHS * train / tr
    else:  # the calibrated stages at their measured speed, the rest at the run's mean
        stages = _schedule(spec.base, spec.overrides)[0]
        train_s = sum(e * train / c.stage_img_s.get(name, c.mean_img_s) for name, e in stages)
    return train_s + (epochs or EPOCHS) * val / inf + test / inf + extra


def table_cost(
    specs: list[RunSpec], rates: dict[str, tuple[float, float]], calib: dict[str, Calibration] | None = None
) -> float:
    """GPU-hours of a table's distinct runs (a compute-matched run's reference must be among them)."""
    by_id = {s.run_id: s for s in specs}
    return sum(run_seconds(s, rates, calib, by_id.get(s.match)) for s in by_id.values()) / 3600.0
