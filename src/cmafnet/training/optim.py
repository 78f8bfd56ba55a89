"""AdamW with weight decay on weights only.

No decay on biases, normalisation parameters, temperatures (``log_tau``), gate biases, positional or
other embeddings, or the objective's learned weights (e.g. the per-head entropy weights): decaying
them pulls temperatures and norms toward 0, which is not a regulariser but a bias.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

NO_DECAY_KEYWORDS = ("bias", "norm", "bn", "tau", "temperature", "embed", "pos_", "cls_token", "gate_b")


def wants_decay(name: str, param: nn.Parameter) -> bool:
    """Weights of linear/conv layers decay; 0-d/1-d tensors and named exemptions do not."""
    if param.ndim <= 1:
        return False  # biases, norm scales, per-head log tau, gate biases
    lname = name.lower()
    return not any(k in lname for k in NO_DECAY_KEYWORDS)


def param_groups(
    named: Iterable[tuple[str, nn.Parameter]],
    weight_decay: float,
    extra_no_decay: Iterable[nn.Parameter] = (),
) -> list[dict]:
    """Split trainable parameters into a decayed and a non-decayed AdamW group.

    Args:
        named: ``(name, parameter)`` pairs; frozen ones (``requires_grad=False``) are left out.
        weight_decay: the decoupled decay of the decayed group.
        extra_no_decay: parameters that never decay whatever their shape (the objective's).
    """
    decay, no_decay, seen = [], [], set()
    for name, p in [*named, *((None, p) for p in extra_no_decay)]:
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            (decay if name is not None and wants_decay(name, p) else no_decay).append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, "name": "decay"})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "name": "no_decay"})
    return groups


def build_adamw(groups: list[dict], lr: float, *, fused: bool, device: torch.device) -> torch.optim.AdamW:
    """AdamW; the fused CUDA kernel when asked for and the parameters live on a CUDA device.

    Otherwise (CPU, or ``fused=False``) the multi-tensor ``foreach`` implementation is requested
    explicitly: torch's default picks it only for CUDA tensors and falls back to one update per
    parameter tensor elsewhere. The two are mutually exclusive in torch.
    """
    if not groups:
        raise ValueError("no trainable parameters for this stage")
    use_fused = bool(fused and device.type == "cuda")
    return torch.optim.AdamW(
        groups,
        lr=lr,
        betas=(0.9, 0.999),
        eps=1e-8,
        fused=True if use_fused else None,
        foreach=None if use_fused else True,
    )
