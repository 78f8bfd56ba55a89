"""Run folders built exactly as training writes them (config.yaml, run.json, model.safetensors)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cmafnet.config import dump_config, load_config
from cmafnet.models import create_model
from cmafnet.run import CONFIG_FILE, META_FILE, WEIGHTS_FILE, save_weights, write_json

CLASSES = ["no_idc", "idc"]


def make_run(
    root: Path,
    model: str = "resnet18",
    threshold: float | None = 0.3,
    weights: bool = True,
    stain: bool = False,
    stain_reference: dict | None = None,
    img_size: int = 64,
) -> Path:
    """A tiny run folder (smoke config, 64 px, random init) following the run-folder contract.

    Stain normalisation is off unless asked for: Macenko on 512-px tiles dominates CPU test time.
    """
    root.mkdir(parents=True, exist_ok=True)
    cfg = load_config(
        "smoke",
        [f"model.name={model}", f"data.stain.enabled={str(stain).lower()}", f"model.img_size={img_size}"],
    )
    (root / CONFIG_FILE).write_text(dump_config(cfg))
    meta = {"classes": CLASSES, "img_size": cfg.model.img_size, "status": "finished", "dataset": "idc"}
    if threshold is not None:
        meta["threshold"] = threshold
    if stain_reference is not None:
        meta["stain_reference"] = stain_reference
    write_json(root / META_FILE, meta)
    if weights:
        torch.manual_seed(0)
        save_weights(create_model(cfg.model), root / WEIGHTS_FILE)
    return root


@pytest.fixture(scope="session")
def run_factory():
    """``make_run`` as a fixture (test folders are not packages, so tests cannot import it)."""
    return make_run


@pytest.fixture(scope="session")
def baseline_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 32 px: the smallest valid input; the CPU test machine is shared, so every FLOP counts.
    return make_run(tmp_path_factory.mktemp("runs") / "resnet18", img_size=32)


@pytest.fixture(scope="session")
def cmaf_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.mktemp("runs") / "cmafnet", model="cmafnet")
