"""What `cmafnet bench` times for CMAF-Net and its references: CMAF-Net through the trainer's own stage
step (:func:`trainer_parts`), the measurement list with its variants (:func:`build_specs`) and the real
input path on a generated IDC-sized store (:func:`measure_cmaf_data_path`)."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("cmafnet.bench")


def trainer_parts(cfg: Any, dev: Any, size: int) -> dict[str, Any]:
    """A model as the trainer trains it in its config's last stage (CMAF-Net: stage 3, end to end, the
    full objective with every regulariser at full weight, past the beta ramp).

    Returns ``build`` (the model), ``trainer(model, **switches) -> (step(x, y), optimizer)`` (the
    trainer's own :func:`~cmafnet.training.prepare_stage`: AdamW with weights-only decay, SAM, AutoClip,
    the non-finite skip, ``train.compile`` and ``train.cuda_graph`` as the switches say, called with
    that stage's first schedule values, the ramp complete) and, for the step
    breakdown, ``loss_fn(model, x, y)`` and ``objective_fn(model, x, y)`` (the objective alone on one
    fixed model output).
    """
    from dataclasses import fields, replace
    from functools import partial

    import torch

    from cmafnet.bench.data_path import IDC_CLASS_COUNTS
    from cmafnet.losses import Objective
    from cmafnet.models import create_model
    from cmafnet.training import prepare_objective, prepare_stage
    from cmafnet.training.schedules import ScheduleValues
    from cmafnet.training.stages import initial_roles

    n = cfg.model.num_classes
    counts = list(IDC_CLASS_COUNTS) if n == 2 else [1000 * (i + 1) for i in range(n)]
    objective = Objective(cfg.loss, cfg.regularizers, counts, num_heads=cfg.model.fusion.heads).to(dev)
    stage = cfg.train.stages[-1]
    epoch = float(sum(s.epochs for s in cfg.train.stages[:-1]))  # the last stage's first epoch
    sched = ScheduleValues(lr=stage.lr, epoch=epoch, beta_ramp=1.0)  # past the beta ramp: full weights

    def build() -> torch.nn.Module:
        return create_model(cfg.model, img_size=size)

    def trainer(
        model: torch.nn.Module,
        *,
        sam: bool,
        compile: bool,
        cuda_graph: bool,
        fused: bool,
        channels_last: bool,
        amp: str,
    ) -> Any:
        sam_cfg = cfg.train.sam.model_copy(update={"enabled": sam, "rho": cfg.train.sam.rho or 0.05})
        tc = cfg.train.model_copy(update={
            "sam": sam_cfg, "compile": compile, "cuda_graph": cuda_graph, "fused_adamw": fused,
            "channels_last": channels_last, "amp": amp,
        })  # fmt: skip
        prepare_objective(objective, tc, dev)
        scaler = torch.amp.GradScaler(dev.type) if amp == "fp16" else None
        st = prepare_stage(model, objective, stage, tc, initial_roles(model), device=dev, scaler=scaler)
        return partial(st, sched=sched), st.optimizer

    def loss_fn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = model(x, return_aux=True)
        return objective(out, y, epoch=epoch, beta_ramp=1.0, use_regularizers=stage.train != "branches")[0]

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
            return objective(fixed, y, epoch=epoch, beta_ramp=1.0, use_regularizers=True)[0]

        return run

    return {"build": build, "trainer": trainer, "loss_fn": loss_fn, "objective_fn": objective_only}


def build_specs(
    cfg: Any,
    dev: Any,
    size: int,
    names: list[str],
    compile_: bool,
    profile: Path | None = None,
    graph: bool = False,
    amp: str = "bf16",
) -> dict[str, Any]:
    from dataclasses import replace

    import timm

    from cmafnet.bench.models import ModelBench
    from cmafnet.bench.naive import NaiveDualBranch

    nc = cfg.model.num_classes
    variant, fusion = cfg.model.contextual.variant, cfg.model.fusion
    specs: dict[str, ModelBench] = {}
    if "cmafnet" in names:
        try:
            parts = trainer_parts(cfg, dev, size)
        except Exception as err:  # the model or objective is not importable: report, go on
            msg = f"{type(err).__name__}: {err}"
            if "kornia" in str(err):
                msg += "; the model's Sobel filter imports kornia: install it (scripts/gpu_check.sh takes wheels/)"

            def unavailable(msg: str = msg) -> Any:
                raise RuntimeError(f"CMAF-Net unavailable ({msg})")

            parts = {"build": unavailable, "trainer": None, "loss_fn": None, "objective_fn": None}
        specs["cmafnet"] = ModelBench(
            "cmafnet", parts["build"], loss_fn=parts["loss_fn"], channels_last=cfg.train.channels_last,
            sam=True, aux_infer=True, fused_adamw=cfg.train.fused_adamw, trainer=parts["trainer"],
            breakdown=True, objective_fn=parts["objective_fn"],
            profile_path=str(profile / "profile_cmafnet.txt") if profile else None,
        )  # fmt: skip
    if "naive" in names:
        specs["naive"] = ModelBench(
            "naive",
            lambda: NaiveDualBranch(variant, dim=fusion.dim, heads=fusion.heads, num_classes=nc),
            breakdown=True,
            profile_path=str(profile / "profile_naive.txt") if profile else None,
        )
    if "resnet18" in names:
        specs["resnet18"] = ModelBench("resnet18", lambda: timm.create_model("resnet18", num_classes=nc))
    if "mobilevit_s" in names:
        specs["mobilevit_s"] = ModelBench(
            "mobilevit_s", lambda: timm.create_model("mobilevit_s", num_classes=nc)
        )
    # train.cuda_graph: the same step, captured whole and replayed (fp16's GradScaler cannot be captured)
    graph = graph and dev.type == "cuda" and "cmafnet" in specs and amp != "fp16"
    if graph:
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

    from cmafnet.bench.data_path import cycle_batches, make_store, measure_data_path
    from cmafnet.bench.models import make_inputs

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
    parts = trainer_parts(cfg, dev, size)
    model = parts["build"]().to(dev)
    cl = cfg.train.channels_last
    if cl:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    # the trainer's step, captured (train.cuda_graph) where it can be: the fastest step leaves the input
    # path the least to hide behind
    graphed = bool(args.graph and dev.type == "cuda" and timing.amp != "fp16")
    step, _ = parts["trainer"](
        model, sam=False, compile=False, cuda_graph=graphed, fused=cfg.train.fused_adamw and dev.type == "cuda",
        channels_last=cl, amp=timing.amp,
    )  # fmt: skip
    premade = make_inputs(batch, size, cfg.model.num_classes, timing, cl)
    rec["step"] = "cuda_graph" if graphed else "eager"

    def preprocess(xb: torch.Tensor) -> torch.Tensor:
        x = prep(xb)
        return x.contiguous(memory_format=torch.channels_last) if cl else x

    rec.update(measure_data_path(cycle_batches(loader), preprocess, step, premade, timing, steps=steps))
    rec["epoch_steps"] = steps_per_epoch
    rec["epoch_estimate_s"] = rec["end_to_end_step_ms"] * steps_per_epoch / 1e3
    rec["epoch_premade_estimate_s"] = rec["premade_step_ms"] * steps_per_epoch / 1e3
    return rec
