"""Every registered baseline: forward/backward at small size, every parameter gets a gradient, the contract.

The list comes from the model registry, so a newly registered model is tested without editing this
file (CMAF-Net and its variants are tested in test_cmafnet.py). 64 px and 3 classes keep the heavy
timm backbones (ResNet-50, DenseNet-121, ConvNeXt-T, Swin-T, ...) under a second each on a CPU.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import cmafnet.models.baselines as baselines
from cmafnet.config import ModelConfig
from cmafnet.errors import ConfigError
from cmafnet.models import MODELS, list_models
from cmafnet.models.output import ModelOutput

# the probe (a frozen backbone, no gradient by design) has its own tests: tests/models/test_probe.py
BASELINE_NAMES = [name for name in list_models() if name not in ("cmafnet", "probe")]


def _build(name: str, **kw) -> torch.nn.Module:
    return MODELS.get(name)(ModelConfig(name=name, img_size=64, **kw))


@pytest.mark.parametrize("name", BASELINE_NAMES)
def test_forward_backward_every_parameter_gets_a_gradient(name: str) -> None:
    torch.manual_seed(0)
    model = _build(name, num_classes=3)
    model.train()
    x = torch.randn(2, 3, 64, 64)
    out = model(x, return_aux=True)
    assert isinstance(out, ModelOutput)
    assert out.logits.shape == (2, 3)
    assert out.pre_logits is not None and out.pre_logits.shape[0] == 2
    out.logits.sum().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None)]
    assert not missing, f"{name}: parameters without gradient: {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # param groups by role partition the parameters
    groups = model.param_groups_by_role()
    assert {"spatial", "head"} <= set(groups)
    ids = [id(p) for ps in groups.values() for p in ps]
    assert len(ids) == len(set(ids)) == sum(1 for _ in model.parameters())


def test_registry_holds_the_papers_baselines() -> None:
    """The parametrisation above is not empty by accident: every paper baseline is registered."""
    assert {*baselines.BASELINES, "transfuse", "mmtm", "hrfnet"} <= set(BASELINE_NAMES)


@pytest.mark.parametrize("name", BASELINE_NAMES)
def test_contract_head_and_reset(name: str) -> None:
    model = _build(name).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits = model(x)
        z = model.forward_head(model.forward_features(x), pre_logits=True)
        assert torch.allclose(model.forward_head(model.forward_features(x)), logits, atol=1e-5)
        model.reset_classifier(5)
        assert model(x).shape == (2, 5) and model.num_classes == 5
        assert model.forward_head(model.forward_features(x), pre_logits=True).shape == z.shape
    assert model.img_size == 64


def test_cosine_head_bounds_logits() -> None:
    model = _build("resnet18", head={"normalized": True}).eval()
    assert isinstance(model.head, baselines.CosineClassifier)
    with torch.no_grad():
        logits = model(torch.randn(4, 3, 64, 64) * 10)
    assert logits.abs().max() <= 1.0 + 1e-5


def test_weights_file_round_trip_and_mismatch(tmp_path) -> None:
    a = _build("resnet18")
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in a.state_dict().items()}, str(path))
    b = _build("resnet18", weights=str(path))
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    # a plain timm backbone checkpoint (with its own classifier) loads into the backbone
    import timm

    t = timm.create_model("resnet18", pretrained=False, num_classes=1000)
    tpath = tmp_path / "timm.safetensors"
    save_file({k: v.contiguous() for k, v in t.state_dict().items()}, str(tpath))
    c = _build("resnet18", weights=str(tpath))
    assert torch.equal(c.backbone.conv1.weight, t.conv1.weight)
    with pytest.raises(ConfigError, match="matches neither"):
        _build("resnet50", weights=str(path))


def test_bad_size_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="multiple of 32"):
        MODELS.get("swin_t")(ModelConfig(name="swin_t", img_size=80))
    with pytest.raises(ConfigError, match="multiple of 32"):
        MODELS.get("transfuse")(ModelConfig(name="transfuse", img_size=80))
