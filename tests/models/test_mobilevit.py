"""The contextual branch: equivalence with timm's MobileViT and the paper's modifications (Nystrom
attention itself: test_attention.py)."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from cmafnet.config import ContextualConfig
from cmafnet.errors import ConfigError
from cmafnet.models import create_model
from cmafnet.models.mobilevit import MobileViT, gradient_magnitude
from cmafnet.models.weights import load_branch_weights, load_strict

ALL_ON = {"attention": "nystrom", "num_landmarks": 4, "scale_aware_pos": True, "learned_pos": True}


def _opts(variant: str = "xxs", **on: object) -> ContextualConfig:
    """``model.contextual`` with every modification off unless switched on here."""
    return ContextualConfig(variant=variant, **{"scale_aware_pos": False, "learned_pos": False, **on})


@pytest.mark.parametrize(("variant", "size"), [("xxs", 96), ("xs", 64), ("s", 64)])
def test_matches_timm_with_modifications_off(variant: str, size: int) -> None:
    torch.manual_seed(0)
    ref = timm.create_model(f"mobilevit_{variant}", pretrained=False, num_classes=0).eval()
    ours = MobileViT(_opts(variant)).eval()  # every modification off
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = ref.forward_features(x)
        got = ours(x)
    assert got.shape == expected.shape == (2, ours.num_features, size // 32, size // 32)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_modifications_change_outputs_but_start_at_timm() -> None:
    """Zero-initialised embeddings reproduce timm at load time; once trained they act."""
    torch.manual_seed(0)
    ref = timm.create_model("mobilevit_xxs", pretrained=False, num_classes=0).eval()
    ours = MobileViT(_opts(scale_aware_pos=True, learned_pos=True), img_size=64).eval()
    load_strict(ours, ref.state_dict(), "mobilevit_xxs", may_miss=tuple(ours.added_parameter_names()))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref.forward_features(x), rtol=1e-5, atol=1e-5)
        # (a channel-uniform shift would be removed by the LayerNorms, hence random weights)
        ours.stages[2][1].scale_embed.weight.normal_()
        assert not torch.allclose(ours(x), ref.forward_features(x), atol=1e-3)


def test_timm_weights_file_loads_into_branch(tmp_path) -> None:
    torch.manual_seed(0)
    ref = timm.create_model("mobilevit_xxs", pretrained=False, num_classes=10).eval()  # head dropped
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "mvit.safetensors"))
    ours = MobileViT(_opts(**ALL_ON)).eval()
    load_branch_weights(ours, tmp_path / "mvit.safetensors", "contextual")
    torch.testing.assert_close(ours.stem.conv.weight, ref.stem.conv.weight)
    torch.testing.assert_close(
        ours.stages[4][1].transformer[2].attn.qkv.weight, ref.stages[4][1].transformer[2].attn.qkv.weight
    )
    # Weights of another variant are refused with the config key named.
    xs = timm.create_model("mobilevit_xs", pretrained=False, num_classes=0)
    save_file({k: v.contiguous() for k, v in xs.state_dict().items()}, str(tmp_path / "xs.safetensors"))
    with pytest.raises(ConfigError, match=r"contextual\.weights"):
        load_branch_weights(ours, tmp_path / "xs.safetensors", "contextual")


@pytest.mark.parametrize("patch", [1, 2, 3, 4])
def test_unfold_fold_roundtrip(patch: int) -> None:
    """With an identity transformer the block's unfold/fold returns the token map unchanged."""
    torch.manual_seed(0)
    m = MobileViT(_opts(patch_size=patch)).eval()
    blk = m.stages[2][1]
    blk.transformer = torch.nn.Identity()
    blk.norm = torch.nn.Identity()
    seen = {}
    blk.conv_proj.register_forward_pre_hook(lambda _m, a: seen.setdefault("folded", a[0]))
    blk.conv_1x1.register_forward_hook(lambda _m, _a, out: seen.setdefault("tokens", out))
    with torch.no_grad():
        blk(torch.randn(1, 48, 8, 8))
    if 8 % patch == 0:  # no resize needed: exact round trip
        torch.testing.assert_close(seen["folded"], seen["tokens"])
    else:  # resized to a multiple of the patch and back (timm's behaviour): same shape
        assert seen["folded"].shape == seen["tokens"].shape


@pytest.mark.parametrize("variant", ["xxs", "xs", "s"])
def test_variants_forward_backward_with_modifications(variant: str) -> None:
    torch.manual_seed(0)
    m = MobileViT(_opts(variant, **ALL_ON), img_size=64).train()
    out = m(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, {"xxs": 320, "xs": 384, "s": 640}[variant], 2, 2)
    out.square().mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert m.added_parameter_names()  # pos / scale embeddings exist and were trained above


def test_learned_pos_interpolates_to_other_sizes() -> None:
    m = MobileViT(_opts(learned_pos=True), img_size=64).eval()
    with torch.no_grad():
        assert m(torch.randn(1, 3, 96, 96)).shape == (1, 320, 3, 3)


def test_gradient_magnitude_is_sobel() -> None:
    x = torch.zeros(1, 3, 16, 16)
    x[..., 8:] = 1.0  # a vertical edge
    g = gradient_magnitude(x)
    assert g.shape == (1, 1, 16, 16)
    assert g[0, 0, 4, 7:9].min() > 0.1 and g[0, 0, 4, :5].max() < 1e-2


def test_unknown_variant() -> None:
    with pytest.raises(ConfigError, match="variant"):
        create_model("cmafnet", contextual={"variant": "xl"})


def test_gradient_magnitude_matches_kornia_sobel():
    import kornia

    from cmafnet.models.mobilevit import gradient_magnitude

    x = torch.randn(3, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    ref = kornia.filters.sobel(x.mean(dim=1, keepdim=True))
    torch.testing.assert_close(gradient_magnitude(x), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("src", "dst"), [((7, 7), (8, 8)), ((8, 8), (7, 7)), ((5, 9), (6, 10)), ((14, 13), (13, 14))]
)
def test_bilinear_resize_equals_interpolate(src: tuple[int, int], dst: tuple[int, int]) -> None:
    from cmafnet.models.mobilevit import bilinear_resize

    x = torch.randn(2, 3, *src, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    g = torch.randn(2, 3, *dst)
    got = bilinear_resize(x, dst)
    ref = F.interpolate(x_ref, size=dst, mode="bilinear", align_corners=False)
    torch.testing.assert_close(got, ref, rtol=0, atol=5e-6)
    (got * g).sum().backward()
    (ref * g).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=5e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # keeps the input dtype under autocast
        assert bilinear_resize(x.detach().bfloat16(), dst).dtype == torch.bfloat16
