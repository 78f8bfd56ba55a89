"""Per-epoch monitors that need gradients (the rest live in :mod:`cmafnet.analysis.information`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def per_class_grad_norms(
    model: nn.Module, x: Tensor, y: Tensor, num_classes: int, head: list[nn.Parameter]
) -> dict[str, float]:
    """L2 norm of the gradient of each class's mean cross-entropy w.r.t. the head parameters.

    Computed on one batch in eval mode (no dropout, no reparameterisation noise, no RNG drawn) so it
    neither perturbs training nor a resumed run. ``head``: the classifier's parameters. Shows whether the minority class still pulls on the
    classifier (Fig. 4-style curves).
    """
    was_training = model.training
    flags = [p.requires_grad for p in head]
    for p in head:
        p.requires_grad_(True)
    model.eval()
    try:
        with torch.enable_grad():
            logits = model(x).float()
            res = {}
            for c in range(num_classes):
                mask = y == c
                if not bool(mask.any()):
                    continue
                loss = F.cross_entropy(logits[mask], y[mask])
                grads = torch.autograd.grad(loss, head, retain_graph=True, allow_unused=True)
                grads = [g for g in grads if g is not None]
                res[f"grad_norm_c{c}"] = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
    finally:
        for p, f in zip(head, flags, strict=True):
            p.requires_grad_(f)
        model.train(was_training)
    return res
