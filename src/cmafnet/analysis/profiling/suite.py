"""What `cmafnet bench` times for CMAF-Net and its references: the model, the trainer's stage-3 loss,
optimiser, SAM and graph step (:func:`cmaf_parts`), the measurement list with its variants
(:func:`build_specs`) and the real input path on a generated IDC-sized store
(:func:`measure_cmaf_data_path`)."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("cmafnet.bench")


def cmaf_parts(cfg: Any, dev: Any, size: int) -> dict[str, Any]:
    """CMAF-Net's builder, stage-3 loss, optimiser and SAM, as the trainer makes them.

    The loss is the objective with every regulariser at full weight (past the beta ramp); the
    optimiser is the trainer's AdamW (weights-only decay) over the model and the objective's own
    parameters; SAM is ``cmafnet.training.sam.SAM`` when that module is importable.
    """
    from dataclasses import fields, replace

    import torch

    from cmafnet.losses import Objective
    from cmafnet.models import create_model

    n = cfg.model.num_classes
    from cmafnet.analysis.profiling.data_path import IDC_CLASS_COUNTS

    counts = list(IDC_CLASS_COUNTS) if n == 2 else [1000 * (i + 1) for i in range(n)]
    objective = Objective(cfg.loss, cfg.regularizers, counts, num_heads=cfg.model.fusion.heads).to(dev)
    objective.set_beta_progress(float(cfg.regularizers.ramp_epochs) + 1.0)
    stage3_epoch = float(sum(s.epochs for s in cfg.train.stages[:-1]))  # first stage-3 epoch
    parts: dict[str, Any] = {"optimizer": None, "sam": None}

    def build() -> torch.nn.Module:
        return create_model(cfg.model, img_size=size)

    def loss_fn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = model(x, return_aux=True)
        total, _ = objective(out, y, epoch=stage3_epoch, use_regularizers=True)
        return total

    def objective_only(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Any:
        out = model(x, return_aux=True)
        leaves = {
            f.name: v.detach().requires_grad_(v.is_floating_point())
            for f in fields(out)
            if isinstance(v := getattr(out, f.name), torch.Tensor)
        }
        fixed = replace(out, **leaves)

        def run() -> torch.Tensor:
            for v in leaves.values():
                v.grad = None
            return objective(fixed, y, epoch=stage3_epoch, use_regularizers=True)[0]

        return run

    parts.update(build=build, loss_fn=loss_fn, objective_fn=objective_only)
    try:
        from cmafnet.training.optim import build_adamw, param_groups
        from cmafnet.training.sam import SAM
    except ImportError as err:  # the trainer's pieces are missing: the generic ones are used
        log.warning("cmafnet.training not importable (%s): generic AdamW and inline SAM", err)
        return parts

    def optimizer(model: torch.nn.Module, fused: bool) -> torch.optim.Optimizer:
        groups = param_groups(model.named_parameters(), cfg.train.weight_decay, objective.parameters())
        return build_adamw(groups, cfg.train.stages[-1].lr, fused=fused, device=dev)

    def sam(opt: torch.optim.Optimizer) -> Any:
        params = [p for g in opt.param_groups for p in g["params"]]
        return SAM(params, rho=cfg.train.sam.rho or 0.05, adaptive=cfg.train.sam.adaptive)

    def device_step(model: torch.nn.Module, opt: torch.optim.Optimizer, with_sam: bool, amp: str) -> Any:
        """The trainer's ``train.cuda_graph`` step: SAM, AutoClip, non-finite skip, all on the device."""
        from cmafnet.training.graphed import DeviceClipper, DeviceStep

        params = [p for g in opt.param_groups for p in g["params"]]

        def loss(out: Any, y: torch.Tensor) -> Any:
            return objective(out, y, epoch=stage3_epoch, use_regularizers=True)

        return DeviceStep(
            model, loss, opt, params, clipper=DeviceClipper(cfg.train.clip, dev),
            sam=sam(opt) if with_sam else None, amp=amp, sdpa_backend=cfg.train.sdpa_backend,
        )  # fmt: skip

    parts.update(optimizer=optimizer, sam=sam, device_step=device_step, setup=objective.compile_regularizers)
    return parts


def build_specs(
    cfg: Any,
    dev: Any,
    size: int,
    names: list[str],
    compile_: bool,
    profile: Path | None = None,
    graph: bool = False,
) -> dict[str, Any]:
    from dataclasses import replace

    import timm

    from cmafnet.analysis.naive_reference import create_naive_reference
    from cmafnet.analysis.profiling.models import ModelBench

    nc = cfg.model.num_classes
    variant, fusion = cfg.model.contextual.variant, cfg.model.fusion
    specs: dict[str, ModelBench] = {}
    if "cmafnet" in names:
        try:
            parts = cmaf_parts(cfg, dev, size)
        except Exception as err:  # the model or objective is not importable: report, go on
            msg = f"{type(err).__name__}: {err}"
            if "kornia" in str(err):
                msg += "; the model's Sobel filter imports kornia: install it (scripts/gpu_check.sh takes wheels/)"

            def unavailable(msg: str = msg) -> Any:
                raise RuntimeError(f"CMAF-Net unavailable ({msg})")

            parts = {
                "build": unavailable,
                "loss_fn": None,
                "optimizer": None,
                "sam": None,
                "device_step": None,
            }
        specs["cmafnet"] = ModelBench(
            "cmafnet", parts["build"], loss_fn=parts["loss_fn"], channels_last=cfg.train.channels_last,
            sam_rho=cfg.train.sam.rho or 0.05, aux_infer=True, fused_adamw=cfg.train.fused_adamw,
            optimizer=parts["optimizer"], sam=parts["sam"], breakdown=True, objective_fn=parts.get("objective_fn"),
            device_step=parts.get("device_step"), setup=parts.get("setup"),
            profile_path=str(profile / "profile_cmafnet.txt") if profile else None,
        )  # fmt: skip
    if "naive" in names:
        specs["naive"] = ModelBench(
            "naive",
            lambda: create_naive_reference(variant, dim=fusion.dim, heads=fusion.heads, num_classes=nc),
            breakdown=True,
            profile_path=str(profile / "profile_naive.txt") if profile else None,
        )
    if "resnet18" in names:
        specs["resnet18"] = ModelBench("resnet18", lambda: timm.create_model("resnet18", num_classes=nc))
    if "mobilevit_s" in names:
        specs["mobilevit_s"] = ModelBench(
            "mobilevit_s", lambda: timm.create_model("mobilevit_s", num_classes=nc)
        )
    graph = graph and dev.type == "cuda" and "cmafnet" in specs
    if graph:  # the same step, captured whole and replayed (cmafnet.training.graphs)
        specs["cmafnet+graph"] = replace(
            specs["cmafnet"], name="cmafnet+graph", cuda_graph=True, gmacs=False, latency=False,
            breakdown=False, profile_path=None, aux_infer=False,
        )  # fmt: skip
    if compile_:
        for key in ("cmafnet", "naive"):
            if key in specs:
                # batch-1 latency is the CUDA-graph column of the eager entry; skipping the
                # reduce-overhead compile here saves a third compilation per model
                specs[f"{key}+compile"] = replace(
                    specs[key], name=f"{key}+compile", compile=True, gmacs=False, breakdown=False,
                    profile_path=None, latency=False,
                )  # fmt: skip
        if graph:
            specs["cmafnet+compile+graph"] = replace(
                specs["cmafnet+graph"], name="cmafnet+compile+graph", compile=True
            )
    return specs


def measure_cmaf_data_path(
    cfg: Any, args: argparse.Namespace, timing: Any, size: int, batch: int
) -> dict[str, Any]:
    """One (fraction of an) epoch of a generated IDC-sized store through BatchLoader + GPUPreprocess."""
    import numpy as np
    import torch

    from cmafnet.analysis.profiling.data_path import cycle_batches, make_store, measure_data_path
    from cmafnet.analysis.profiling.models import make_inputs
    from cmafnet.analysis.profiling.steps import make_optimizer, make_train_step

    dev = timing.device
    rec: dict[str, Any] = {"store_size": args.store_size, "epoch_fraction": args.epoch_fraction}
    try:
        from cmafnet.data.loader import BatchLoader
        from cmafnet.data.transforms import GPUPreprocess
    except ImportError as err:
        hint = " (kornia is needed for the device-side augmentation)" if "kornia" in str(err) else ""
        rec["note"] = f"data path not measured: {err}{hint}"
        rec["errors"] = {"import": rec["note"]}
        return rec
    steps_per_epoch = args.store_size // batch
    steps = max(1, round(args.epoch_fraction * steps_per_epoch))
    t0 = time.perf_counter()
    images, labels = make_store(args.store_size, seed=cfg.train.seed)
    rec["store_generate_s"] = time.perf_counter() - t0
    rec["store_GiB"] = images.nbytes / 2**30
    t0 = time.perf_counter()
    loader = BatchLoader(
        images,
        labels,
        np.arange(len(labels)),
        batch,
        shuffle=True,
        seed=cfg.train.seed,
        device=dev,
        drop_last=True,
    )
    prep = GPUPreprocess(cfg.data, img_size=size, train=True)
    if isinstance(prep, torch.nn.Module):
        prep = prep.to(dev)
    rec["loader_setup_s"] = time.perf_counter() - t0
    parts = cmaf_parts(cfg, dev, size)
    model = parts["build"]().to(dev)
    cl = cfg.train.channels_last
    if cl:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    fused = cfg.train.fused_adamw and dev.type == "cuda"
    opt = parts["optimizer"](model, fused) if parts["optimizer"] else make_optimizer(model, fused=fused)
    graphed = args.graph and dev.type == "cuda" and parts.get("device_step") and timing.amp != "fp16"
    premade = make_inputs(batch, size, cfg.model.num_classes, timing, cl)
    rec["step"] = "cuda_graph" if graphed else "eager"
    if (
        graphed
    ):  # the trainer's train.cuda_graph step, the fastest: the input path has the least to hide behind
        from cmafnet.training.graphs import GraphedStep

        step = GraphedStep(parts["device_step"](model, opt, False, timing.amp), list(premade), optimizer=opt)
    else:
        step = make_train_step(model, parts["loss_fn"], opt, timing)

    def preprocess(xb: torch.Tensor) -> torch.Tensor:
        x = prep(xb)
        return x.contiguous(memory_format=torch.channels_last) if cl else x

    rec.update(measure_data_path(cycle_batches(loader), preprocess, step, premade, timing, steps=steps))
    rec["epoch_steps"] = steps_per_epoch
    rec["epoch_estimate_s"] = rec["end_to_end_step_ms"] * steps_per_epoch / 1e3
    rec["epoch_premade_estimate_s"] = rec["premade_step_ms"] * steps_per_epoch / 1e3
    return rec
