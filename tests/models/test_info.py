"""``cmafnet info``: parameters and MACs, table and JSON, bad configs exit 2."""

from __future__ import annotations

import json

import pytest
import timm
import torch

from cmafnet.cli import main
from cmafnet.cli.info import model_info
from cmafnet.config import list_configs, load_config


def test_info_json_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--config", "smoke", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["input_size"] == 64
    comps = info["components"]
    assert {"spatial", "contextual", "fusion", "head", "aux_heads"} <= set(comps)
    assert sum(c["params"] for c in comps.values()) == info["params_total"]
    assert info["macs_per_image"] > comps["spatial"]["macs"] > comps["contextual"]["macs"] > 0
    assert sum(c["macs"] for c in comps.values()) == info["macs_per_image"]


def test_info_attributes_macs_of_children_called_indirectly() -> None:
    """A child whose parent calls only its sub-modules (timm ``forward_features``) still gets its MACs."""
    from cmafnet.models import create_model

    info = model_info(create_model(load_config("baseline_smoke").model), 64, name="baseline")
    assert info["model"] == "baseline"
    assert sum(c["macs"] for c in info["components"].values()) == info["macs_per_image"] > 0
    assert max(c["macs"] for c in info["components"].values()) > 0.9 * info["macs_per_image"]


def test_macs_match_known_resnet18() -> None:
    """The counter reproduces ResNet-18's well-known 1.82 GMACs at 224 px."""
    info = model_info(timm.create_model("resnet18", pretrained=False), 224)
    assert info["macs_per_image"] == pytest.approx(1.82e9, rel=0.01)
    assert info["params_total"] == sum(p.numel() for p in timm.create_model("resnet18").parameters())


def test_info_counts_attention_matmuls() -> None:
    """SDPA is counted (forced onto the math backend): Nystrom with fewer landmarks costs fewer MACs."""
    from cmafnet.models import create_model

    kw = {"img_size": 64, "contextual": {"variant": "xxs"}, "fusion": {"dim": 32, "heads": 4}}
    full = model_info(create_model("cmafnet", **kw), 96)
    kw["contextual"] = {"variant": "xxs", "attention": "nystrom", "num_landmarks": 2}
    ny = model_info(create_model("cmafnet", **kw), 96)
    assert ny["components"]["contextual"]["macs"] < full["components"]["contextual"]["macs"]


def test_info_paper_config_table(capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    assert main(["info", "--config", "paper", "--size", "224"]) == 0
    out = capsys.readouterr().out
    assert "224x224" in out and "MACs" in out and "total" in out
    total = next(line for line in out.splitlines() if line.startswith("total")).split()
    params_m, gmacs = float(total[1]), float(total[2])
    # ResNet-18 (11.7 M) + MobileViT-S (5.1 M without its classifier) + fusion: far above 12.3 M
    assert 17.0 < params_m < 22.0
    assert 3.0 < gmacs < 4.0


@pytest.mark.parametrize(
    "override",
    ["model.fusion.heads=7", "model.fusion.bogus=1", "model.fusion.kind=sum", "model.contextual.variant=xl"],
)
def test_bad_config_exits_2(override: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--config", "smoke", "--set", override]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cmafnet info: error:") and len(err.splitlines()) == 1


@pytest.mark.parametrize("name", list_configs())
def test_every_shipped_config_builds(name: str) -> None:
    from cmafnet.models import create_model

    # a probe's foundation model is built with random weights here: the architecture, offline
    cfg = load_config(name, ["model.probe.backbone=random"] if name.startswith("probe") else [])
    model = create_model(cfg.model)
    assert model.num_classes == cfg.model.num_classes
    assert model.img_size == cfg.model.img_size
