"""Batched Macenko stain normalisation in torch (runs on whatever device the batch is on).

Macenko et al., "A method for normalizing histology slides for quantitative analysis", ISBI 2009,
following the reference implementation that torchstain also adapts (Io 240, alpha 1, beta 0.15,
the standard H&E reference matrix and maximum concentrations). Per image:

1. optical density ``OD = -log((I + 1) / Io)``; tissue pixels have every channel's OD >= beta;
2. the plane of the two largest eigenvectors of the tissue OD covariance; angles of the tissue
   pixels in that plane; the alpha / (100 - alpha) percentile angles give the two stain vectors
   (hematoxylin first: the one with the larger red OD);
3. concentrations by least squares (2x2 normal equations), scaled so their 99th percentile matches the
   reference, and recomposed with the reference stain matrix.

Differences from the per-image reference loop: everything is batched (masked covariance,
``nanquantile`` over tissue pixels), and the largest eigenvector is oriented to a positive sum
(OD vectors are positive) so the result does not depend on the eigen-solver's sign convention.
Low-tissue images (blank glass, pen-only tiles) fall back to the input unchanged and are flagged.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

HE_REF = ((0.5626, 0.2159), (0.7201, 0.8012), (0.4062, 0.5581))
MAX_C_REF = (1.9705, 1.0308)
_QUANTILE_MAX = 1 << 23  # torch.quantile refuses very large inputs: chunk the batch below this


def _quantile(x: torch.Tensor, q: float, *, nan: bool) -> torch.Tensor:
    """Quantile over the last dim, chunked over the first (``nan``: ignore NaNs)."""
    fn = torch.nanquantile if nan else torch.quantile
    step = max(1, _QUANTILE_MAX // max(1, x[0].numel()))
    return torch.cat([fn(x[i : i + step], q, dim=-1) for i in range(0, x.shape[0], step)])


class MacenkoNormalizer(nn.Module):
    """Batched Macenko normalisation: ``(B, 3, H, W)`` in [0, 255] -> same shape and range.

    Args:
        Io: transmitted light intensity.
        alpha: percentile (in %) of the angle distribution taken as the stain extremes.
        beta: OD threshold for tissue pixels.
        min_tissue_frac: fewer tissue pixels than this fraction (and than 16) -> fallback.
    """

    def __init__(
        self, Io: float = 240.0, alpha: float = 1.0, beta: float = 0.15, *, min_tissue_frac: float = 0.05
    ) -> None:
        super().__init__()
        self.Io, self.alpha, self.beta = float(Io), float(alpha), float(beta)
        self.min_tissue_frac = min_tissue_frac
        self.register_buffer("he_ref", torch.tensor(HE_REF, dtype=torch.float32))  # (3, 2)
        self.register_buffer("max_c_ref", torch.tensor(MAX_C_REF, dtype=torch.float32))  # (2,)
        self.reference_source = "standard H&E (Macenko 2009)"
        self.last_fallback: torch.Tensor | None = None  # (B,) bool from the latest forward

    # ----------------------------------------------------------------------------- the method
    def _od(self, x: torch.Tensor) -> torch.Tensor:
        # (B, 3, H, W) -> (B, P, 3) optical density
        return -torch.log((x.float().flatten(2).transpose(1, 2) + 1.0) / self.Io)

    def stain_matrix(self, od: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-image stain matrices from OD ``(B, P, 3)``.

        Returns:
            ``he`` (B, 3, 2) with hematoxylin first, ``conc`` (B, 2, P) concentrations, and
            ``ok`` (B,) False where there was too little tissue or the fit degenerated.
        """
        b, p, _ = od.shape
        mask = (od >= self.beta).all(-1)  # (B, P) tissue pixels
        n = mask.sum(1)  # (B,)
        ok = n >= max(16, int(self.min_tissue_frac * p))
        w = mask.unsqueeze(-1).to(od.dtype)  # (B, P, 1)
        nf = n.clamp_min(2).to(od.dtype).view(b, 1, 1)
        mean = (od * w).sum(1, keepdim=True) / nf  # (B, 1, 3)
        d = (od - mean) * w
        cov = d.transpose(1, 2) @ d / (nf - 1)  # (B, 3, 3)
        eye = torch.eye(3, device=od.device, dtype=od.dtype).expand(b, 3, 3)
        ok = ok & (cov.diagonal(dim1=1, dim2=2).sum(-1) > 1e-6)  # flat images have no stain axes
        cov = torch.where(ok.view(b, 1, 1), cov, eye)  # keep eigh well-posed for fallbacks
        _, vecs = torch.linalg.eigh(cov)  # ascending eigenvalues
        e1, e2 = vecs[..., 1], vecs[..., 2]  # (B, 3): second largest, largest
        e2 = e2 * torch.where(e2.sum(-1, keepdim=True) < 0, -1.0, 1.0)
        t1 = (od * e1.unsqueeze(1)).sum(-1)  # (B, P) coordinates in the plane
        t2 = (od * e2.unsqueeze(1)).sum(-1)
        phi = torch.atan2(t2, t1).masked_fill(~mask, float("nan"))
        phi = torch.where(ok.view(b, 1), phi, torch.zeros_like(phi))  # no all-NaN rows
        lo = _quantile(phi, self.alpha / 100, nan=True).unsqueeze(-1)  # (B, 1)
        hi = _quantile(phi, 1 - self.alpha / 100, nan=True).unsqueeze(-1)
        ok = ok & ((hi - lo).squeeze(-1) > 1e-3)  # one colour only: the two stains coincide
        v_min = e1 * torch.cos(lo) + e2 * torch.sin(lo)  # (B, 3)
        v_max = e1 * torch.cos(hi) + e2 * torch.sin(hi)
        h_first = (v_min[:, 0] > v_max[:, 0]).view(b, 1)
        hema = torch.where(h_first, v_min, v_max)
        eosin = torch.where(h_first, v_max, v_min)
        he = torch.stack([hema, eosin], -1)  # (B, 3, 2)
        # least squares via the 2x2 normal equations, inverted in closed form (no batched SVD)
        g = he.transpose(1, 2) @ he  # (B, 2, 2)
        det = g[:, 0, 0] * g[:, 1, 1] - g[:, 0, 1] * g[:, 1, 0]
        ok = ok & (det.abs() > 1e-8)
        adj = torch.stack([g[:, 1, 1], -g[:, 0, 1], -g[:, 1, 0], g[:, 0, 0]], -1).view(b, 2, 2)
        g_inv = adj / torch.where(ok, det, torch.ones_like(det)).view(b, 1, 1)
        conc = g_inv @ (he.transpose(1, 2) @ od.transpose(1, 2))  # (B, 2, P)
        ok = ok & torch.isfinite(he).all((1, 2)) & torch.isfinite(conc).all((1, 2))
        return he, conc, ok

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise a batch; low-tissue images come back unchanged (see ``last_fallback``)."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected (B, 3, H, W), got {tuple(x.shape)}")
        b, _, h, w = x.shape
        od = self._od(x)
        _, conc, ok = self.stain_matrix(od)
        max_c = _quantile(torch.nan_to_num(conc), 0.99, nan=False)  # (B, 2)
        ok = ok & (max_c > 1e-6).all(-1)
        scale = (max_c / self.max_c_ref).clamp_min(1e-6).unsqueeze(-1)  # (B, 2, 1)
        out = self.Io * torch.exp(-(self.he_ref @ (conc / scale)))  # (B, 3, P)
        out = out.clamp(max=255.0).view(b, 3, h, w)
        ok = ok & torch.isfinite(out).flatten(1).all(-1)
        self.last_fallback = ~ok
        return torch.where(ok.view(b, 1, 1, 1), out, x.float())

    # ----------------------------------------------------------------------------- reference
    @torch.no_grad()
    def fit(self, image: np.ndarray, source: str = "image") -> MacenkoNormalizer:
        """Fit the reference stain matrix and max concentrations to one RGB ``(H, W, 3)`` uint8 image.

        Args:
            source: recorded in :meth:`to_dict`.

        Raises:
            ValueError: the image has too little tissue to define stains.
        """
        t = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # (3, H, W)
        od = self._od(t.unsqueeze(0).to(self.he_ref.device))
        he, conc, ok = self.stain_matrix(od)
        if not bool(ok[0]):
            raise ValueError(f"reference image {source} has too little tissue for Macenko")
        self.he_ref.copy_(he[0])
        self.max_c_ref.copy_(_quantile(conc, 0.99, nan=False)[0])
        self.reference_source = source
        return self

    def to_dict(self) -> dict[str, Any]:
        """JSON-able reference (for ``run.json``)."""
        return {
            "method": "macenko",
            "Io": self.Io, "alpha": self.alpha, "beta": self.beta, "min_tissue_frac": self.min_tissue_frac,
            "he_ref": self.he_ref.cpu().tolist(),
            "max_c_ref": self.max_c_ref.cpu().tolist(),
            "source": self.reference_source,
        }  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MacenkoNormalizer:
        m = cls(d["Io"], d["alpha"], d["beta"], min_tissue_frac=d.get("min_tissue_frac", 0.05))
        m.he_ref.copy_(torch.tensor(d["he_ref"], dtype=torch.float32))
        m.max_c_ref.copy_(torch.tensor(d["max_c_ref"], dtype=torch.float32))
        m.reference_source = d.get("source", "run.json")
        return m


@functools.lru_cache(maxsize=8)
def _fitted_reference(path: str, _mtime_ns: int, Io: float, alpha: float, beta: float) -> dict[str, Any]:
    from PIL import Image

    with Image.open(path) as im:
        if im.mode not in ("RGB", "RGBA"):
            raise ValueError(f"stain reference {path}: mode {im.mode}, need RGB")
        arr = np.asarray(im.convert("RGB"))  # RGBA: the alpha channel is dropped
    return MacenkoNormalizer(Io, alpha, beta).fit(arr, source=Path(path).name).to_dict()


def build_normalizer(
    Io: float = 240.0, alpha: float = 1.0, beta: float = 0.15, reference: str | Path | None = None
) -> MacenkoNormalizer:
    """A normaliser with the standard reference, or one fitted once (cached) to ``reference``."""
    if reference is None:
        return MacenkoNormalizer(Io, alpha, beta)
    p = Path(reference)
    if not p.exists():
        from cmafnet.errors import ConfigError

        raise ConfigError(f"data.stain.reference: file not found: {p}")
    return MacenkoNormalizer.from_dict(
        _fitted_reference(str(p.resolve()), p.stat().st_mtime_ns, Io, alpha, beta)
    )
