"""Fast-path switches flipped one at a time against the main measurement of a model."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from cmafnet.bench.models import ModelBench
from cmafnet.bench.timing import Timing

SWITCHES = (
    "channels_last", "channels_last_spatial_only", "autocast", "fused_adamw", "return_aux_off", "sdpa",
    "cuda_graph", "compile",
)  # fmt: skip


def _pair(on: dict, off: dict, metrics: tuple[str, ...] = ("train_img_s", "infer_img_s")) -> dict:
    """``{metric: {"on", "off", "speedup"}}`` of two results (speed-up = on / off), with their errors."""
    out: dict[str, Any] = {}
    for m in metrics:
        if m not in on and m not in off:
            continue
        a, b = on.get(m), off.get(m)
        out[m] = {"on": a, "off": b, "speedup": (a / b) if a and b else None}
    if on.get("errors") or off.get("errors"):
        out["errors"] = {**on.get("errors", {}), **off.get("errors", {})}
    return out


def run_switches(
    specs: dict[str, ModelBench],
    models: dict[str, dict],
    bench: Callable[..., dict],
    timing: Timing,
    only: set[str] | None = None,
) -> dict[str, Any]:
    """Each fast-path switch flipped alone against the main measurement (training + inference).

    Args:
        specs: the main :class:`ModelBench` of each model (by key: cmafnet, naive, resnet18, ...).
        models: their main results (from :func:`bench_model`).
        bench: ``bench(spec, timing) -> result``, :func:`bench_model` with the run's sizes bound.
        timing: the run's timing settings.
        only: the switches to measure (names of :data:`SWITCHES`; None = all). ``cuda_graph``,
            ``compile`` and ``return_aux_off`` reuse main measurements and cost nothing.

    Returns:
        ``{switch: {model: {metric: {"on", "off", "speedup"}}}}`` (speed-up = on / off), plus
        ``errors`` inside an entry when one of its measurements failed.
    """

    def flipped(spec: ModelBench, t: Timing = timing) -> dict:
        lean = replace(
            spec, latency=False, gmacs=False, sam=False, aux_infer=False, breakdown=False, profile_path=None
        )
        return bench(lean, t)

    want = (lambda name: True) if only is None else only.__contains__
    res: dict[str, Any] = {}
    if want("channels_last"):
        cl = {}
        for key in ("resnet18", "mobilevit_s", "cmafnet"):
            if key in specs and "train_img_s" in models.get(key, {}):
                spec = specs[key]
                other = flipped(replace(spec, channels_last=not spec.channels_last))
                cl[key] = _pair(models[key], other) if spec.channels_last else _pair(other, models[key])
        if cl:
            res["channels_last"] = cl
    if "cmafnet" in specs and "train_img_s" in models.get("cmafnet", {}):
        res.update(_cmafnet_switches(specs["cmafnet"], models["cmafnet"], flipped, timing, want))
    if "naive" in specs and "train_img_s" in models.get("naive", {}) and want("sdpa"):
        build = specs["naive"].build

        def materialized() -> Any:
            m = build()
            m.materialize_attention = True
            return m

        res["sdpa"] = {"naive": _pair(models["naive"], flipped(replace(specs["naive"], build=materialized)))}
    res.update(_variant_switches(models, want))
    return res


def _cmafnet_switches(
    spec: ModelBench, main: dict, flipped: Callable[..., dict], timing: Timing, want: Callable[[str], bool]
) -> dict[str, Any]:
    """The switches measured on CMAF-Net alone: per-branch channels-last, autocast, fused AdamW, and
    the cost of the auxiliary outputs at inference."""
    res: dict[str, Any] = {}
    build = spec.build

    def spatial_nhwc() -> Any:
        # NHWC weights make cuDNN run the ResNet convs channels-last while the MobileViT branch
        # (NCHW weights, NCHW input) stays as it is: channels_last per branch, no model change
        m = build()
        if getattr(m, "spatial", None) is not None:
            m.spatial.to(memory_format=torch.channels_last)
        return m

    if want("channels_last_spatial_only"):
        per_branch = flipped(replace(spec, build=spatial_nhwc, channels_last=False))
        # on = ResNet branch only NHWC, off = the main measurement (the config's global setting)
        res["channels_last_spatial_only"] = {"cmafnet": _pair(per_branch, main)}
    if timing.amp != "none" and want("autocast"):
        fp32 = flipped(spec, Timing(timing.device, timing.steps, timing.warmup, "none"))
        res["autocast_" + timing.amp] = {"cmafnet": _pair(main, fp32)}
    if timing.device.type == "cuda" and want("fused_adamw"):  # fused AdamW is used on CUDA only
        other = flipped(replace(spec, fused_adamw=not spec.fused_adamw))
        res["fused_adamw"] = {"cmafnet": _pair(main, other) if spec.fused_adamw else _pair(other, main)}
    if main.get("infer_img_s") and main.get("infer_aux_img_s") and want("return_aux_off"):
        res["return_aux_off"] = {"cmafnet": {
            "infer_img_s": {"on": main["infer_img_s"], "off": main["infer_aux_img_s"],
                            "speedup": main["infer_img_s"] / main["infer_aux_img_s"]},
        }}  # fmt: skip
    return res


def _variant_switches(models: dict[str, dict], want: Callable[[str], bool]) -> dict[str, Any]:
    """``compile`` and ``cuda_graph`` from the variants already measured (no new measurement)."""
    res: dict[str, Any] = {}
    metrics = ("train_img_s", "train_sam_img_s", "infer_img_s")
    for key in ("cmafnet", "naive"):
        c = models.get(f"{key}+compile")
        if c and models.get(key) and want("compile"):
            res.setdefault("compile", {})[key] = _pair(c, models[key], metrics)
    if models.get("cmafnet+graph") and models.get("cmafnet") and want("cuda_graph"):
        res["cuda_graph"] = {"cmafnet": _pair(models["cmafnet+graph"], models["cmafnet"], metrics)}
        if models.get("cmafnet+compile+graph") and models.get("cmafnet+compile"):
            res["cuda_graph"]["cmafnet+compile"] = _pair(
                models["cmafnet+compile+graph"], models["cmafnet+compile"], metrics
            )
    return res
