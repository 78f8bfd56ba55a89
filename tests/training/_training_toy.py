"""A tiny model and data set that follow the model/data contracts, for fast training-engine tests."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cmafnet.config import Config, config_from_dict
from cmafnet.data.loader import BatchLoader
from cmafnet.losses.objective import Objective
from cmafnet.models.output import ModelOutput
from cmafnet.training import TrainData, TrainRun, build_run, run_stages
from cmafnet.training import distributed as distr
from cmafnet.training.checkpoint import restore_run
from cmafnet.training.fit import seed_everything


class ToyNet(nn.Module):
    """Two 'branches', temporary heads, a 'fusion' layer and a head; ``(B,3,8,8) -> (B,2)``."""

    def __init__(self, dropout: float = 0.1, bn: bool = True):
        super().__init__()
        self.spatial = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4) if bn else nn.Identity(), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.contextual = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.aux_heads = nn.ModuleDict({"spatial": nn.Linear(4, 2), "contextual": nn.Linear(4, 2)})
        self.fusion = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Dropout(dropout))
        self.head = nn.Linear(8, 2)

    def param_groups_by_role(self) -> dict[str, list[nn.Parameter]]:
        return {
            name: list(getattr(self, name).parameters())
            for name in ("spatial", "contextual", "aux_heads", "fusion", "head")
        }

    def forward(self, x: torch.Tensor, return_aux: bool = False):
        s, t = self.spatial(x), self.contextual(x)  # (B, 4) each
        logits = self.head(self.fusion(torch.cat([s, t], 1)))
        if not return_aux:
            return logits
        aux = {"spatial": self.aux_heads["spatial"](s), "contextual": self.aux_heads["contextual"](t)}
        return ModelOutput(logits=logits, aux_logits=aux)


def toy_config(**train: object) -> Config:
    stages = [
        {"name": "branches", "epochs": 2, "lr": 1e-2, "schedule": "cosine", "train": "branches", "loss": "ce"},
        {"name": "fusion", "epochs": 2, "lr": 1e-2, "schedule": "warmup_cosine", "warmup_epochs": 0.5, "train": "fusion"},
        {"name": "end_to_end", "epochs": 2, "lr": 1e-3, "schedule": "cyclic", "train": "all"},
    ]  # fmt: skip
    t = {
        "stages": stages, "batch_size": 8, "eval_batch_size": 16, "amp": "none", "channels_last": False,
        "fused_adamw": False, "early_stopping_patience": None, "log_every": 1, "device": "cpu",
        "max_steps_per_epoch": 3,
    }  # fmt: skip
    t.update(train)
    loss = {"name": "acbfl"}
    return config_from_dict({"model": {"fusion": {"heads": 1, "dim": 8}}, "train": t, "loss": loss})


def toy_data(
    n: int = 40, noise: float = 0.05, nan_steps: set[int] | None = None, seed: int = 0, device: str = "cpu"
) -> TrainData:
    """Random 8x8 uint8 images whose label is visible in the red channel; 32 train, 8 val (with the default n).

    ``noise`` adds N(0, noise) from the global torch RNG in the training preprocessing (exercises RNG
    checkpointing); ``nan_steps``: the preprocessing of those training calls returns NaN.
    """
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    images = rng.integers(0, 128, (n, 8, 8, 3), dtype=np.uint8)
    images[..., 0] += (labels * 100).astype(np.uint8)[:, None, None]
    train_idx, val_idx = np.arange(0, n - 8), np.arange(n - 8, n)
    calls = {"n": 0}

    def make_loader(indices, bs, shuffle, drop_last, epoch, start):
        loader = BatchLoader(
            images, labels, indices, bs, shuffle=shuffle, seed=seed, drop_last=drop_last, device=device
        )
        loader.set_epoch(epoch, start)
        return loader

    def pre_train(x8: torch.Tensor) -> torch.Tensor:
        x = x8.float() / 255.0 - 0.5
        if noise:
            x = x + noise * torch.randn_like(x)
        calls["n"] += 1
        if nan_steps and calls["n"] in nan_steps:
            x = x * float("nan")
        return x

    def pre_eval(x8: torch.Tensor) -> torch.Tensor:
        return x8.float() / 255.0 - 0.5

    meta = {"store_hash": "toy", "split_hash": "toy"}
    return TrainData(make_loader, train_idx, val_idx, labels, ["neg", "pos"], pre_train, pre_eval, meta)


def make_trainer(
    out: Path, cfg: Config, data: TrainData | None = None, *, info=None, model_kw=None, device=None, **kw
) -> TrainRun:
    """What ``fit`` does, with the toy model and data: seed, build, wrap (on ``device`` if given)."""
    seed_everything(cfg.train.seed)
    data = data or toy_data(device=device or "cpu")  # the data must live where the model does
    model = ToyNet(**(model_kw or {}))
    if device is not None:  # the run takes its device from the model's parameters
        model = model.to(device)
    objective = Objective(cfg.loss, cfg.regularizers, data.class_counts, num_heads=1)
    return build_run(cfg, model, objective, data, out, info=info, progress=False, **kw)


def ddp_worker(rank: int, world: int, out: str, port: int) -> None:
    """One rank of the 2-process DDP test (gloo on CPU); rank 0 writes the final weights."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        info = distr.setup("cpu")
        cfg = ddp_config()
        trainer = make_trainer(
            Path(out), cfg, toy_data(noise=0.0), info=info, model_kw={"dropout": 0.0, "bn": False}
        )
        run_stages(trainer)
        if rank == 0:
            torch.save(trainer.model.state_dict(), Path(out) / "final.pt")
    finally:
        torch.distributed.destroy_process_group()


def ddp_config() -> Config:
    return toy_config(
        batch_size=8, max_steps_per_epoch=2, clip={"kind": "norm", "max_norm": 1.0},
        stages=[{"name": "all", "epochs": 2, "lr": 1e-2, "schedule": "cosine", "train": "all", "loss": "ce"}],
    )  # fmt: skip


def resume_and_compare(ref: TrainRun, run_dir: Path, cfg: Config, state: dict) -> None:
    """Resume a stopped run in ``run_dir`` from ``state`` and check it ends exactly like ``ref`` (an
    uninterrupted run of ``cfg``): bit-identical weights and buffers, the same metrics rows."""
    import pandas as pd

    resumed = make_trainer(run_dir, cfg)
    restore_run(resumed, state)
    run_stages(resumed)
    a, b = ref.model.state_dict(), resumed.model.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), (
            f"{k} differs after resuming at step {state['progress']['global_step']}"
        )
    timing = ["time_s", "train_img_s", "step_ms", "val_s"]  # wall-clock columns differ between any two runs
    pd.testing.assert_frame_equal(
        pd.read_csv(ref.out / "metrics.csv").drop(columns=timing),
        pd.read_csv(run_dir / "metrics.csv").drop(columns=timing),
    )
