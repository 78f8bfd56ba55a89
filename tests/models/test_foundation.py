"""The foundation-model catalogue: every entry builds its timm architecture and yields the embedding it states;
weights load strictly from timm or transformers layouts; gated and offline Hub errors are one line (exit 2)."""

from __future__ import annotations

from unittest.mock import MagicMock

import pytest
import timm
import torch

from cmafnet.cli import main
from cmafnet.config import ProbeConfig
from cmafnet.errors import ConfigError
from cmafnet.models.foundation import (
    RANDOM,
    _create,
    build_backbone,
    catalogue,
    embed,
    embedding_dim,
    foundation_entry,
    load_backbone_state,
    resolve_backbone,
    weights_fingerprint,
)
from cmafnet.models.hf_vit import is_transformers_layout

SMALL = {"phikon", "kaiko-vits16", "kaiko-vitb16", "hibou-b"}  # ViT-S/B: built in a second, even on a CPU


@pytest.mark.parametrize(
    "key", [k if k in SMALL else pytest.param(k, marks=pytest.mark.slow) for k in catalogue()]
)
def test_every_entry_builds_its_architecture_with_the_stated_embedding(key: str) -> None:
    """On the meta device (no memory, no weights): the architecture and kwargs fit the stated width."""
    e = catalogue()[key]
    with torch.device("meta"):
        backbone = _create(e.arch, {**e.kwargs, "img_size": e.img_size})
        z = embed(backbone, torch.empty(2, 3, e.img_size, e.img_size), e.embedding)
    assert tuple(z.shape) == (2, e.dim) and embedding_dim(backbone, e.embedding) == e.dim


def test_the_catalogue_holds_the_models_the_field_compares_against() -> None:
    entries = catalogue()
    names = {e.name for e in entries.values()}
    assert {"UNI", "UNI2-h", "Virchow2", "H-optimus-0", "Midnight-12k", "Phikon", "Phikon-v2", "Kaiko ViT-S/16",
            "Kaiko ViT-B/16", "Prov-GigaPath", "Hibou-B"} <= names  # fmt: skip
    for e in entries.values():
        assert e.sources and all(isinstance(x, str) and x for x in (*e.sources, *e.unverified)), e.key
        assert (
            len(e.mean) == len(e.std) == 3
            and e.mpp > 0
            and e.licence
            and e.format in ("timm", "transformers")
        )
    # facts the model cards state
    assert entries["uni"].gated and entries["uni"].dim == 1024 and entries["uni"].licence == "CC-BY-NC-ND-4.0"
    assert entries["virchow2"].embedding == "cls+mean" and entries["virchow2"].dim == 2560
    assert entries["midnight-12k"].embedding == "cls+mean" and entries["midnight-12k"].dim == 3072
    assert entries["h-optimus-0"].mean == (0.707223, 0.578729, 0.703617)
    assert not entries["phikon"].gated and entries["prov-gigapath"].kwargs["patch_size"] == 16


def test_info_lists_the_catalogue_and_refuses_an_unknown_name(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--foundation"]) == 0
    out = capsys.readouterr().out
    for e in catalogue().values():
        assert e.key in out and e.hub in out
    assert main(["info", "--foundation", "virchow2"]) == 0
    assert "paige-ai/Virchow2" in capsys.readouterr().out
    assert main(["info", "--foundation", "virchow3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Did you mean 'virchow2'" in err


def _hub_raises(monkeypatch: pytest.MonkeyPatch, err: Exception) -> None:
    import huggingface_hub

    def fail(*args, **kwargs):
        raise err

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fail)


def test_a_gated_model_is_one_line_naming_the_licence_step(monkeypatch, capsys) -> None:
    from huggingface_hub.errors import GatedRepoError

    _hub_raises(
        monkeypatch, GatedRepoError("Access to model MahmoodLab/UNI is restricted", response=MagicMock())
    )
    rc = main(["info", "--config", "probe_paper", "--set", "model.probe.foundation=uni"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert (
        "gated" in err and "https://huggingface.co/MahmoodLab/UNI" in err and "model.probe.backbone=" in err
    )


def test_an_unreachable_model_is_one_line_offering_a_local_file(monkeypatch) -> None:
    from huggingface_hub.errors import LocalEntryNotFoundError

    _hub_raises(monkeypatch, LocalEntryNotFoundError("cannot find the requested files in the local cache"))
    spec = resolve_backbone(ProbeConfig(foundation="phikon"), 224)
    with pytest.raises(ConfigError) as info:
        build_backbone(spec)
    msg = str(info.value)
    assert (
        "\n" not in msg and "hf-hub:owkin/phikon could not be fetched (not in the Hugging Face cache" in msg
    )
    assert "--set model.probe.backbone=/path/to/model.safetensors" in msg


def _tiny_vit(**kw) -> torch.nn.Module:
    args = {
        "img_size": 32,
        "patch_size": 8,
        "embed_dim": 48,
        "depth": 2,
        "num_heads": 3,
        "num_classes": 0,
        **kw,
    }
    torch.manual_seed(0)
    return timm.create_model("vit_small_patch16_224", **args).eval()


def _as_transformers(sd: dict[str, torch.Tensor], dinov2: bool, registers: bool) -> dict[str, torch.Tensor]:
    """A timm ViT state dict under transformers' names (ViTModel, or Dinov2Model with registers), written out
    here from transformers' module names, independently of cmafnet.models.hf_vit."""
    out = {
        "embeddings.cls_token": sd["cls_token"],
        "embeddings.mask_token": torch.zeros(1, sd["cls_token"].shape[-1]),
    }
    pos = sd["pos_embed"]
    if registers:  # transformers embeds [cls, patches] with one table; timm folded cls's entry into the token
        out["embeddings.register_tokens"] = sd["reg_token"]
        out["embeddings.cls_token"] = sd["cls_token"] - 0.5
        pos = torch.cat([torch.full_like(pos[:, :1], 0.5), pos], 1)
    out["embeddings.position_embeddings"] = pos
    out["embeddings.patch_embeddings.projection.weight"] = sd["patch_embed.proj.weight"]
    out["embeddings.patch_embeddings.projection.bias"] = sd["patch_embed.proj.bias"]
    n1, n2 = ("norm1", "norm2") if dinov2 else ("layernorm_before", "layernorm_after")
    fc1, fc2 = ("mlp.fc1", "mlp.fc2") if dinov2 else ("intermediate.dense", "output.dense")
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        b, h = f"blocks.{i}.", f"encoder.layer.{i}."
        q, k, v = sd[b + "attn.qkv.weight"].chunk(3)
        qb, kb, vb = sd[b + "attn.qkv.bias"].chunk(3)
        for name, w, bias in (("query", q, qb), ("key", k, kb), ("value", v, vb)):
            out[h + f"attention.attention.{name}.weight"], out[h + f"attention.attention.{name}.bias"] = (
                w,
                bias,
            )
        for p in ("weight", "bias"):
            out[h + f"{n1}.{p}"], out[h + f"{n2}.{p}"] = sd[b + f"norm1.{p}"], sd[b + f"norm2.{p}"]
            out[h + f"attention.output.dense.{p}"] = sd[b + f"attn.proj.{p}"]
            out[h + f"{fc1}.{p}"], out[h + f"{fc2}.{p}"] = sd[b + f"mlp.fc1.{p}"], sd[b + f"mlp.fc2.{p}"]
        if dinov2:
            out[h + "layer_scale1.lambda1"], out[h + "layer_scale2.lambda1"] = (
                sd[b + "ls1.gamma"],
                sd[b + "ls2.gamma"],
            )
    out["layernorm.weight"], out["layernorm.bias"] = sd["norm.weight"], sd["norm.bias"]
    if not dinov2:
        out["pooler.dense.weight"] = torch.zeros(1)  # ViTModel's pooler: not part of the backbone
    return out


@pytest.mark.parametrize(
    ("dinov2", "kw"),
    [(False, {}), (True, {"init_values": 1e-2, "reg_tokens": 4, "no_embed_class": True})],
    ids=["vitmodel", "dinov2-registers"],
)
def test_transformers_weights_load_into_timm_with_the_same_outputs(dinov2: bool, kw: dict) -> None:
    """Phikon (ViTModel) and Hibou-style (DINOv2 with registers) checkpoints give timm's exact outputs."""
    source = _tiny_vit(**kw)
    for p in source.parameters():  # no tensor left at a value a wrong mapping could also produce
        p.data.normal_(0, 0.2)
    hf = _as_transformers(source.state_dict(), dinov2, registers="reg_tokens" in kw)
    assert is_transformers_layout(hf)
    target = _tiny_vit(**kw)
    load_backbone_state(target, hf, "hf.safetensors", "model.probe.backbone")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(target.forward_features(x), source.forward_features(x), atol=1e-5)
    own = source.state_dict()
    assert all(torch.allclose(t, own[k], atol=1e-6) for k, t in target.state_dict().items())


def test_a_local_file_loads_strictly(tmp_path) -> None:
    from safetensors.torch import save_file

    source = _tiny_vit()
    for p in source.parameters():
        p.data.normal_(0, 0.2)
    sd = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(sd, tmp_path / "vit.safetensors")
    probe = ProbeConfig(backbone=str(tmp_path / "vit.safetensors"), arch="vit_small_patch16_224",
                        arch_kwargs={"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3})  # fmt: skip
    spec = resolve_backbone(probe, 32)
    assert weights_fingerprint(build_backbone(spec)) == weights_fingerprint(source)
    del sd["blocks.1.mlp.fc2.weight"]
    save_file(sd, tmp_path / "vit.safetensors")
    with pytest.raises(
        ConfigError, match=r"does not fit the backbone \(missing \['blocks.1.mlp.fc2.weight'\]"
    ):
        build_backbone(spec)
    with pytest.raises(ConfigError, match="is not a file"):
        build_backbone(resolve_backbone(probe.model_copy(update={"backbone": str(tmp_path / "no.bin")}), 32))


def test_a_random_stand_in_is_the_same_network_every_time() -> None:
    probe = ProbeConfig(
        backbone=RANDOM, arch="vit_tiny_patch16_224", arch_kwargs={"img_size": 32, "depth": 1}
    )
    a, b = (build_backbone(resolve_backbone(probe, 32)) for _ in range(2))
    assert weights_fingerprint(a) == weights_fingerprint(b)
    with pytest.raises(
        ConfigError, match=r"model.probe.arch: the backbone 'random' needs its timm architecture"
    ):
        resolve_backbone(ProbeConfig(backbone=RANDOM), 32)
    with pytest.raises(ConfigError, match="Did you mean 'uni'"):
        foundation_entry("unii")
