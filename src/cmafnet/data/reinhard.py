"""Reinhard colour transfer (Reinhard et al. 2001, "Color transfer between images"), batched in torch.

The second stain normaliser beside :mod:`cmafnet.data.stain` (Macenko): a training run records its
reference (the LAB statistics of its training patches, run.json ``reinhard_reference``), and
``--stain-norm reinhard`` maps target images to it (:mod:`cmafnet.inference.adapt`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from cmafnet.errors import ConfigError


def batched_rgb(images: Tensor) -> Tensor:
    """``(3, H, W)`` or ``(B, 3, H, W)`` -> ``(B, 3, H, W)``, checking the channel count."""
    x = images.unsqueeze(0) if images.ndim == 3 else images
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected RGB (B, 3, H, W) or (3, H, W), got {tuple(images.shape)}")
    return x


class ReinhardNormalizer(nn.Module):
    """Reinhard colour transfer, batched in torch: each image's LAB mean/std matched to a reference's.

    Per image, in CIELAB (``kornia.color.rgb_to_lab``: L in [0, 100], a/b about [-128, 127]):
    ``lab' = (lab - mean_img) / std_img * std_ref + mean_ref`` per channel, then back to RGB.
    Statistics (of the image and of the reference) are taken over *tissue* pixels only, i.e.
    ``L < background_l`` (default 90): glass background is near-white (L ≈ 95-100 in H&E scans)
    and, counted in, would make the statistics depend on how much of the tile is empty rather than
    on the stain. 90 keeps pale eosin (L ≈ 75-88) as tissue. Background pixels are left as they are
    (blended in over ``ramp`` L units below ``background_l``, so there is no seam), so white stays white.

    Input and output: RGB ``(B, 3, H, W)``; uint8 comes back uint8 (rounded), float comes back
    float in ``[0, value_range]`` (default 255, as :class:`~cmafnet.data.stain.MacenkoNormalizer`,
    so either can sit at the same place in the preprocessing; 1.0 for [0, 1] floats). Images with
    fewer than ``max(16, min_tissue_frac · H · W)`` tissue pixels, or a flat channel
    (std < ``min_std``), come back unchanged and are flagged in ``last_fallback`` (B,) bool.
    """

    def __init__(
        self,
        background_l: float = 90.0,
        *,
        ramp: float = 5.0,
        min_tissue_frac: float = 0.05,
        min_std: float = 0.5,
        value_range: float = 255.0,
    ) -> None:
        super().__init__()
        self.background_l, self.ramp = float(background_l), float(ramp)
        self.min_tissue_frac, self.min_std = float(min_tissue_frac), float(min_std)
        self.value_range = float(value_range)
        self.register_buffer("ref_mean", torch.full((3,), float("nan")))  # (3,) L, a, b
        self.register_buffer("ref_std", torch.full((3,), float("nan")))  # (3,)
        self.reference_source = "unfitted"
        self.last_fallback: Tensor | None = None  # (B,) bool from the latest forward

    @property
    def fitted(self) -> bool:
        return bool(torch.isfinite(self.ref_mean).all() and torch.isfinite(self.ref_std).all())

    def _lab_stats(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """LAB image, tissue mask and per-image tissue mean / std / pixel count.

        Returns ``lab`` (B, 3, H, W), ``mask`` (B, 1, H, W) bool, ``mean`` / ``std`` (B, 3), ``n`` (B,).
        """
        import kornia.color

        unit = (x.float() / (255.0 if x.dtype == torch.uint8 else self.value_range)).clamp(0.0, 1.0)
        lab = kornia.color.rgb_to_lab(unit)  # (B, 3, H, W)
        mask = lab[:, :1] < self.background_l  # (B, 1, H, W)
        w = mask.to(lab.dtype)
        n = w.sum((1, 2, 3))  # (B,)
        nn_ = n.clamp_min(1.0).view(-1, 1)
        mean = (lab * w).sum((2, 3)) / nn_  # (B, 3)
        var = (((lab - mean[..., None, None]) * w) ** 2).sum((2, 3)) / nn_
        return lab, mask, mean, var.sqrt(), n

    @torch.no_grad()
    def fit(self, target: Tensor, source: str = "images") -> ReinhardNormalizer:
        """Fit the reference LAB mean / std over the tissue pixels of all ``target`` images pooled.

        Args:
            target: RGB ``(B, 3, H, W)`` or ``(3, H, W)``, uint8 or float (see ``value_range``).
            source: recorded in :meth:`to_dict`.

        Raises:
            ValueError: the images hold too little tissue (``L < background_l``) to define a reference.
        """
        x = batched_rgb(target).to(self.ref_mean.device)
        lab, mask, *_ = self._lab_stats(x)
        pix = lab.permute(1, 0, 2, 3)[:, mask.squeeze(1)]  # (3, P) tissue pixels of all images
        if pix.shape[1] < max(16, int(self.min_tissue_frac * mask.numel())):
            raise ValueError(f"Reinhard reference {source}: too little tissue (L < {self.background_l})")
        self.ref_mean.copy_(pix.mean(1))
        self.ref_std.copy_(pix.std(1, unbiased=False))
        if bool((self.ref_std < self.min_std).any()):
            raise ValueError(f"Reinhard reference {source}: a flat LAB channel (std {self.ref_std.tolist()})")
        self.reference_source = source
        return self

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        """Normalise a batch ``(B, 3, H, W)``; same dtype and range out (see the class docstring)."""
        import kornia.color

        if not self.fitted:
            raise RuntimeError("ReinhardNormalizer has no reference: call fit() or from_dict() first")
        x = batched_rgb(x)
        b, _, h, w = x.shape
        lab, _, mean, std, n = self._lab_stats(x)
        ok = (n >= max(16, int(self.min_tissue_frac * h * w))) & (std >= self.min_std).all(-1)  # (B,)
        scale = self.ref_std / std.clamp_min(self.min_std)  # (B, 3)
        mapped = (lab - mean[..., None, None]) * scale[..., None, None] + self.ref_mean.view(1, 3, 1, 1)
        # weight 1 on tissue, 0 on background, linear over the ramp below background_l: no seam
        wgt = ((self.background_l - lab[:, :1]) / max(self.ramp, 1e-6)).clamp(0.0, 1.0)  # (B, 1, H, W)
        lab = wgt * mapped + (1.0 - wgt) * lab
        lab = torch.cat([lab[:, :1].clamp(0.0, 100.0), lab[:, 1:]], 1)
        rgb = kornia.color.lab_to_rgb(lab, clip=True)  # (B, 3, H, W) in [0, 1]
        if x.dtype == torch.uint8:
            out = (rgb * 255.0).round().to(torch.uint8)
        else:
            out = (rgb * self.value_range).to(x.dtype)
        self.last_fallback = ~ok
        return torch.where(ok.view(b, 1, 1, 1), out, x)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able reference (for ``run.json`` or an evaluation summary)."""
        return {
            "method": "reinhard",
            "mean_lab": [float(v) for v in self.ref_mean.cpu()],
            "std_lab": [float(v) for v in self.ref_std.cpu()],
            "background_l": self.background_l,
            "source": self.reference_source,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ReinhardNormalizer:
        """The normaliser :meth:`to_dict` (or :func:`reference_stats`) described."""
        try:
            m = cls(float(d.get("background_l", 90.0)))
            m.ref_mean.copy_(torch.tensor([float(v) for v in d["mean_lab"]]))
            m.ref_std.copy_(torch.tensor([float(v) for v in d["std_lab"]]))
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise ConfigError(f"bad Reinhard stain reference {d!r}: {e}") from e
        if not m.fitted or bool((m.ref_std <= 0).any()):
            raise ConfigError(f"bad Reinhard stain reference {d!r}: non-finite or non-positive values")
        m.reference_source = str(d.get("source", "stored reference"))
        return m


def reference_stats(images: Tensor, source: str = "images", background_l: float = 90.0) -> dict[str, Any]:
    """The JSON-able Reinhard reference of ``images`` (RGB ``(B, 3, H, W)``, uint8 or float in [0, 255]).

    Store it and rebuild the normaliser with :meth:`ReinhardNormalizer.from_dict`.
    """
    return ReinhardNormalizer(background_l).fit(images, source=source).to_dict()
