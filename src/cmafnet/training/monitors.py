"""Per-epoch validation: metrics of the main logits plus the monitors of docs/decisions/training.md (the information
quantities themselves live in :mod:`cmafnet.training.information`)."""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmafnet.training.information import MonitorAccumulator
from cmafnet.training.step import autocast_context

log = logging.getLogger(__name__)


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


@torch.no_grad()
def validate(
    model: nn.Module,
    data: Any,
    tc: Any,
    *,
    head: list[nn.Parameter],
    objective: nn.Module,
    device: torch.device,
    loss_epoch: float,
) -> tuple[dict, dict]:
    """Metrics (``classification_metrics``; multi-class adds macro one-vs-rest AUPRC) and monitors.

    Args:
        model: the unwrapped model (put back in train mode afterwards).
        data: a :class:`~cmafnet.training.progress.TrainData`.
        tc: the ``train`` config section (eval batch, amp, channels_last).
        head: the classifier parameters for the per-class gradient norms.
        objective: for its learned per-head entropy weights, when it has them.
        loss_epoch: the classification loss's clock for the per-class loss weights it reports.
    """
    from cmafnet.evaluation.metrics import classification_metrics

    C = len(data.classes)
    loader = data.make_loader(False, 0, 0)
    model.eval()
    cls_loss = getattr(objective, "loss", None)
    weights = getattr(cls_loss, "sample_weights", None)
    acc = MonitorAccumulator(C, loss_weights=None if weights is None else partial(weights, epoch=loss_epoch))
    probs, ys = [], []
    first = None
    for x8, y, _ in loader:
        x = data.preprocess_eval(x8)
        if tc.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast_context(device, tc.amp):
            out = model(x, return_aux=True)
        acc.update(out, y)
        probs.append(F.softmax(out.logits.float(), 1).cpu())
        ys.append(y.cpu())
        if first is None:
            first = (x[: tc.batch_size], y[: tc.batch_size])
    model.train()
    if not ys:
        return {}, {}
    y_all, p_all = torch.cat(ys).numpy(), torch.cat(probs).numpy()
    if not np.isfinite(p_all).all():
        log.warning("validation predictions are not finite: no validation metrics this epoch")
        return {"nonfinite_predictions": 1.0}, acc.result()
    m = classification_metrics(y_all, p_all)
    metrics = {k: v for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if C > 2:  # macro one-vs-rest average precision: the multi-class best-model criterion
        from sklearn.metrics import average_precision_score
        from sklearn.preprocessing import label_binarize

        present = np.unique(y_all)
        onehot = label_binarize(y_all, classes=list(range(C)))
        metrics["auprc"] = float(
            average_precision_score(onehot[:, present], p_all[:, present], average="macro")
        )
    monitors = acc.result()
    if head:  # a kNN probe has no parameter to take gradients of
        with torch.enable_grad():
            monitors.update(per_class_grad_norms(model, first[0], first[1], C, head))
    if hasattr(objective, "entropy_weights"):
        for h, w in enumerate(objective.entropy_weights.float().cpu().tolist()):
            monitors[f"entropy_weight_h{h}"] = w
    return metrics, monitors
