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

    def flipped(spec: Any, t: Any = timing) -> dict:
        s = replace(
            spec,
            latency=False,
            gmacs=False,
            sam=False,
            aux_infer=False,
            breakdown=False,
            profile_path=None,
        )
        return bench(s, t)

    def pair(on: dict, off: dict, metrics: tuple[str, ...] = ("train_img_s", "infer_img_s")) -> dict:
        out: dict[str, Any] = {}
        for m in metrics:
            if m not in on and m not in off:
                continue
            a, b = on.get(m), off.get(m)
            out[m] = {"on": a, "off": b, "speedup": (a / b) if a and b else None}
        if on.get("errors") or off.get("errors"):
            out["errors"] = {**on.get("errors", {}), **off.get("errors", {})}
        return out

    want = (lambda name: True) if only is None else only.__contains__
    res: dict[str, Any] = {}
    cl: dict[str, Any] = {}
    for key in ("resnet18", "mobilevit_s", "cmafnet") if want("channels_last") else ():
        if key in specs and "train_img_s" in models.get(key, {}):
            spec = specs[key]
            other = flipped(replace(spec, channels_last=not spec.channels_last))
            on, off = (models[key], other) if spec.channels_last else (other, models[key])
            cl[key] = pair(on, off)
    if cl:
        res["channels_last"] = cl
    if "cmafnet" in specs and "train_img_s" in models.get("cmafnet", {}):
        spec = specs["cmafnet"]
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
            res["channels_last_spatial_only"] = {"cmafnet": pair(per_branch, models["cmafnet"])}
        if timing.amp != "none" and want("autocast"):
            fp32 = flipped(spec, Timing(timing.device, timing.steps, timing.warmup, "none"))
            res["autocast_" + timing.amp] = {"cmafnet": pair(models["cmafnet"], fp32)}
        if timing.device.type == "cuda" and want(
            "fused_adamw"
        ):  # fused AdamW is a CUDA kernel; CPU uses foreach either way
            other = flipped(replace(spec, fused_adamw=not spec.fused_adamw))
            on, off = (models["cmafnet"], other) if spec.fused_adamw else (other, models["cmafnet"])
            res["fused_adamw"] = {"cmafnet": pair(on, off)}
        m = models["cmafnet"]
        if m.get("infer_img_s") and m.get("infer_aux_img_s") and want("return_aux_off"):
            res["return_aux_off"] = {"cmafnet": {
                "infer_img_s": {"on": m["infer_img_s"], "off": m["infer_aux_img_s"],
                                "speedup": m["infer_img_s"] / m["infer_aux_img_s"]},
            }}  # fmt: skip
    if "naive" in specs and "train_img_s" in models.get("naive", {}) and want("sdpa"):
        base = specs["naive"]
        build = base.build

        def materialized() -> Any:
            m = build()
            m.materialize_attention = True
            return m

        res["sdpa"] = {"naive": pair(models["naive"], flipped(replace(base, build=materialized)))}
    metrics = ("train_img_s", "train_sam_img_s", "infer_img_s")
    for key in ("cmafnet", "naive"):
        c = models.get(f"{key}+compile")
        if c and models.get(key) and want("compile"):
            res.setdefault("compile", {})[key] = pair(c, models[key], metrics)
    if models.get("cmafnet+graph") and models.get("cmafnet") and want("cuda_graph"):
        res["cuda_graph"] = {"cmafnet": pair(models["cmafnet+graph"], models["cmafnet"], metrics)}
        if models.get("cmafnet+compile+graph") and models.get("cmafnet+compile"):
            res["cuda_graph"]["cmafnet+compile"] = pair(
                models["cmafnet+compile+graph"], models["cmafnet+compile"], metrics
            )
    return res
