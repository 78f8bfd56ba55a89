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
# transformers names (or name prefixes) outside the blocks -> timm's
_RENAMES = {
    "embeddings.cls_token": "cls_token",
    "embeddings.register_tokens": "reg_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.": "patch_embed.proj.",
    "layernorm.": "norm.",
}
_PREFIXES = ("vit.", "dinov2.", "model.")  # task models wrap the backbone under one of these


def is_transformers_layout(state_dict: dict[str, Tensor]) -> bool:
    """Whether ``state_dict`` uses transformers' ViT / DINOv2 names."""
    return any(k.endswith("embeddings.patch_embeddings.projection.weight") for k in state_dict)


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
        if key == "embeddings.mask_token" or key.startswith("pooler."):
            continue  # masked-image-modelling token and the ViT pooler: unused by a feature extractor
        top = next((name for name in _RENAMES if key.startswith(name)), None)
        m = _LAYER.match(key)
        layer, rest = m.groups() if m else ("", "")  # rest: the name inside the layer
        module, _, param = rest.rpartition(".")
        if top is not None:
            out[_RENAMES[top] + key[len(top) :]] = value
        elif rest.startswith("attention.attention.") and module.rpartition(".")[2] in _QKV:
            qkv.setdefault(layer, {}).setdefault(param, {})[module.rpartition(".")[2]] = value
        elif rest.startswith("layer_scale"):  # layer_scale1.lambda1 -> ls1.gamma
            out[f"blocks.{layer}.ls{rest[len('layer_scale')]}.gamma"] = value
        elif module in _BLOCK_NAMES:
            out[f"blocks.{layer}.{_BLOCK_NAMES[module]}.{param}"] = value
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
