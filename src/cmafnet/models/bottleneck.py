"""Variational information bottleneck on a branch's token map (paper §3, Eq. 4; corrections in docs/decisions.md)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class VariationalBottleneck(nn.Module):
    """Per-token Gaussian encoder ``q(z|x) = N(mu, diag(exp(logvar)))`` (Alemi et al., 2017).

    Training draws the reparameterised sample ``z = mu + eps * exp(logvar / 2)``; evaluation uses
    ``mu`` (and skips the log-variance head unless asked for it). The KL to N(0, I) is computed by
    the objective from the returned ``mu`` / ``logvar``.

    The log-variance head starts at ``logvar = init_logvar`` everywhere (zero weights), i.e. a small
    noise scale (std ~0.14 for -4) so that switching the bottleneck on does not drown the features.
    """

    def __init__(self, dim: int, init_logvar: float = -4.0) -> None:
        super().__init__()
        self.mu = nn.Linear(dim, dim)
        self.logvar = nn.Linear(dim, dim)
        nn.init.zeros_(self.logvar.weight)
        nn.init.constant_(self.logvar.bias, init_logvar)

    def forward(
        self, tokens: Tensor, need_stats: bool = False
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """``tokens (B, N, D) -> (z, mu, logvar)``; ``logvar`` is None when not needed (eval, plain)."""
        mu = self.mu(tokens)
        if not (self.training or need_stats):
            return mu, mu, None
        logvar = self.logvar(tokens)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        return z, mu, logvar
