"""Hugging Face ``transformers`` ViT / DINOv2 weights in timm's key layout.

Some pathology foundation models (Phikon: ``ViTModel``; Phikon-v2, Midnight: ``Dinov2Model``; Hibou:
DINOv2 with register tokens) are published as ``transformers`` checkpoints. Their tensors are the
same as those of timm's ``VisionTransformer`` under other names, with query, key and value as three
matrices where timm packs one ``qkv``; so they load into the timm architectures of the catalogue
without ``transformers`` installed. Position embeddings are resampled to the model's grid by timm's
own ``checkpoint_filter_fn`` afterwards.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
# transformers block sub-module -> timm block sub-module (ViTModel and Dinov2Model names)
_BLOCK_NAMES = {
    "norm1": "norm1",
    "layernorm_before": "norm1",
    "norm2": "norm2",
    "layernorm_after": "norm2",
    "attention.output.dense": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "mlp.weights_in": "mlp.fc1",  # SwiGLU: one packed input matrix, as timm's SwiGLUPacked
    "mlp.weights_out": "mlp.fc2",
}
_QKV = ("query", "key", "value")
_PREFIXES = ("vit.", "dinov2.", "model.")  # task models wrap the backbone under one of these


def is_transformers_layout(state_dict: dict[str, Tensor]) -> bool:
    """Whether ``state_dict`` uses transformers' ViT / DINOv2 names."""
    return any(k.endswith("embeddings.patch_embeddings.projection.weight") for k in state_dict)


def _block_key(layer: str, rest: str) -> str | None:
    """timm name of one block tensor (``rest`` = transformers name inside the layer), or None to drop."""
    if rest.startswith("layer_scale"):  # layer_scale1.lambda1 -> ls1.gamma
        return f"blocks.{layer}.ls{rest[len('layer_scale')]}.gamma"
    module, _, param = rest.rpartition(".")
    name = _BLOCK_NAMES.get(module)
    return f"blocks.{layer}.{name}.{param}" if name else None


def transformers_to_timm(state_dict: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Rename a transformers ViT / DINOv2 state dict to the timm ``VisionTransformer`` ``model``.

    Register tokens are placed as timm's DINOv2-with-registers models hold them: without position
    embedding, the class token's own position embedding folded into it (``no_embed_class``).

    Raises:
        ValueError: a tensor has no timm counterpart (another architecture).
    """
    prefix = next((p for p in _PREFIXES if any(k.startswith(p + "embeddings.") for k in state_dict)), "")
    sd = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    out: dict[str, Tensor] = {}
    qkv: dict[str, dict[str, dict[str, Tensor]]] = {}  # layer -> weight/bias -> q/k/v
    for key, value in sd.items():
        if key in ("embeddings.mask_token",) or key.startswith("pooler."):
            continue  # masked-image-modelling token and the ViT pooler: unused by a feature extractor
        if key == "embeddings.cls_token":
            out["cls_token"] = value
        elif key == "embeddings.register_tokens":
            out["reg_token"] = value
        elif key == "embeddings.position_embeddings":
            out["pos_embed"] = value
        elif key.startswith("embeddings.patch_embeddings.projection."):
            out["patch_embed.proj." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("layernorm."):
            out["norm." + key.rsplit(".", 1)[1]] = value
        elif m := _LAYER.match(key):
            layer, rest = m.groups()
            parts = rest.split(".")
            if rest.startswith("attention.attention.") and parts[2] in _QKV:
                qkv.setdefault(layer, {}).setdefault(parts[3], {})[parts[2]] = value
                continue
            name = _block_key(layer, rest)
            if name is None:
                raise ValueError(f"no timm counterpart for transformers tensor '{key}'")
            out[name] = value
        else:
            raise ValueError(f"no timm counterpart for transformers tensor '{key}'")
    for layer, params in qkv.items():
        for param, mats in params.items():
            out[f"blocks.{layer}.attn.qkv.{param}"] = torch.cat([mats[n] for n in _QKV], 0)  # (3D, ...)
    if getattr(model, "no_embed_class", False) and "pos_embed" in out and "cls_token" in out:
        # transformers adds position embeddings to [cls, patches]; timm's no_embed_class models add them to
        # the patches only, so the class token takes its own in advance
        out["cls_token"] = out["cls_token"] + out["pos_embed"][:, :1]
        out["pos_embed"] = out["pos_embed"][:, 1:]
    return out
