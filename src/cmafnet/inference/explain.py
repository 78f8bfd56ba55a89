"""Per-image explanation overlays.

* CMAF-Net runs: the cross-modal attention and the gate, from ``model(x, return_aux=True)``:
  - attention map = ``ModelOutput.attn`` ``(B, H, N_s, N_t)`` averaged over heads, then summed over
    the spatial queries: how much attention each contextual location *receives* from the spatial
    grid (``(B, N_t)``, reshaped to the fusion grid ``f_t``'s ``h x w``);
  - gate map = ``ModelOutput.gate`` ``(B, D, h, w)`` averaged over channels: where the fused feature
    takes the attended (contextual) path (g -> 1) rather than the spatial residual (g -> 0).
* Other models (baselines): Grad-CAM (``pytorch_grad_cam``, the grad-cam package) on the last
  convolution, for the positive class of a binary run or the predicted class otherwise.

Each map is min-max scaled per image, upsampled bilinearly to the displayed image and blended with
a colour map; one PNG per image (image | map(s)) is written to the output folder, under a header
naming the file, the probability of the positive (or predicted) class and the decision with its
threshold, and a label over each panel.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from cmafnet.inference.predict import Predictor

log = logging.getLogger(__name__)

DISPLAY_MAX = 256  # displayed image edge cap (pixels)


def cmaf_maps(out: object) -> dict[str, torch.Tensor]:
    """``{"attention": (B, h, w), "gate": (B, h, w)}`` from a :class:`ModelOutput` (absent parts skipped)."""
    maps: dict[str, torch.Tensor] = {}
    attn = getattr(out, "attn", None)
    if attn is not None:
        received = attn.float().mean(1).sum(1)  # (B, H, Ns, Nt) -> (B, Ns, Nt) -> (B, Nt)
        n, ref = received.shape[1], getattr(out, "f_t", None)  # f_t: the fusion grid (B, D, h, w)
        if ref is not None and ref.ndim == 4 and ref.shape[-2] * ref.shape[-1] == n:
            h, w = int(ref.shape[-2]), int(ref.shape[-1])
        else:
            h = w = math.isqrt(n)
            if h * w != n:
                raise ValueError(f"cannot lay {n} tokens on a square grid")
        maps["attention"] = received.view(-1, h, w)
    gate = getattr(out, "gate", None)
    if gate is not None:
        maps["gate"] = gate.float().mean(1)  # (B, D, h, w) -> (B, h, w)
    return maps


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blend a ``[0, 1]`` map (any size) over an RGB uint8 image with the jet colour map."""
    import matplotlib

    h, w = image.shape[:2]
    t = torch.from_numpy(np.ascontiguousarray(heat, dtype=np.float32))[None, None]
    heat = F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)[0, 0].numpy()
    lo, hi = float(heat.min()), float(heat.max())
    heat = (heat - lo) / (hi - lo) if hi > lo else np.zeros_like(heat)
    colour = matplotlib.colormaps["jet"](heat)[..., :3]  # (h, w, 3) in [0, 1]
    return ((1 - alpha) * image / 255.0 + alpha * colour).clip(0, 1).__mul__(255).astype(np.uint8)


def _display(image: np.ndarray) -> np.ndarray:
    from PIL import Image

    h, w = image.shape[:2]
    scale = min(1.0, DISPLAY_MAX / max(h, w)) if max(h, w) > DISPLAY_MAX else max(1.0, 128 / max(h, w))
    if scale == 1.0:
        return image
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BICUBIC))


HEADER_PX = 22  # title bar height
LABEL_PX = 16  # panel label bar height


def titled(canvas: np.ndarray, title: str, labels: list[str]) -> np.ndarray:
    """``canvas`` (equal-width panels side by side) under a title bar and one label per panel."""
    from PIL import Image, ImageDraw, ImageFont

    h, w = canvas.shape[:2]
    out = Image.new("RGB", (w, h + HEADER_PX + LABEL_PX), (255, 255, 255))
    out.paste(Image.fromarray(canvas), (0, HEADER_PX + LABEL_PX))
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default(size=12)
    draw.text((4, 4), title, fill=(0, 0, 0), font=font)
    pw = w // max(1, len(labels))
    for k, label in enumerate(labels):
        draw.text((k * pw + 4, HEADER_PX + 1), label, fill=(60, 60, 60), font=font)
    return np.asarray(out)


class Explainer:
    """Writes one overlay PNG per image for the predictor's model."""

    def __init__(self, predictor: Predictor, out_dir: str | Path) -> None:
        self.predictor = predictor
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.count = 0
        self.kind: str | None = None  # "cmaf" | "gradcam", decided on the first batch
        self._cam = None

    def _title(self, name: str, p: np.ndarray, decision: str) -> str:
        classes, binary = self.predictor.classes, len(self.predictor.classes) == 2
        k = 1 if binary else int(np.argmax(p))
        rule = f"threshold {self.predictor.threshold:.3g}" if binary else "argmax"
        return f"{name}  |  P({classes[k]}) = {p[k]:.3f}  |  decision: {decision} ({rule})"

    def _maps(self, x: torch.Tensor) -> tuple[list[str], list[np.ndarray]]:
        model = self.predictor.model
        if self.kind in (None, "cmaf"):
            with torch.inference_mode():
                out = model(x, return_aux=True)
            maps = cmaf_maps(out)
            if maps:
                self.kind = "cmaf"
                names = list(maps)
                return names, list(torch.stack([maps[k] for k in names], 1).cpu().numpy())  # (n, h, w) each
            self.kind = "gradcam"
        return ["grad-cam"], [m[None] for m in self._gradcam(x)]

    def _gradcam(self, x: torch.Tensor) -> np.ndarray:
        try:
            from pytorch_grad_cam import GradCAM
            from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
        except ImportError:
            from cmafnet.errors import ConfigError

            raise ConfigError(
                "Grad-CAM explanations of baselines need grad-cam: pip install 'cmafnet[explain]'"
            ) from None

        model = self.predictor.model
        if self._cam is None:
            # the last convolution in module order: Grad-CAM's usual target layer for CNNs
            convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
            if not convs:
                raise RuntimeError("Grad-CAM needs a convolution layer; this model has none")
            self._cam = GradCAM(model=model, target_layers=convs[-1:])
        targets = [ClassifierOutputTarget(1)] * x.shape[0] if len(self.predictor.classes) == 2 else None
        with torch.enable_grad():
            cams = self._cam(input_tensor=x.detach().clone(), targets=targets)  # (B, S, S) in [0, 1]
        return np.asarray(cams)

    def explain(
        self,
        images: list[np.ndarray],
        paths: list[Path],
        probs: np.ndarray,
        decisions: list[str],
    ) -> list[Path]:
        """Write overlays for a batch of same-size uint8 RGB images; returns the PNG paths.

        ``probs`` ``(B, C)`` and ``decisions`` (what the prediction reported) title the panels.
        """
        from PIL import Image

        x = self.predictor.to_input(images)
        try:
            names, maps = self._maps(x)
        except Exception as err:  # an explanation must never stop prediction
            log.warning("explanation failed for a batch (%s: %s)", type(err).__name__, err)
            return []
        written = []
        for img, path, m, p, dec in zip(images, paths, maps, probs, decisions):
            disp = _display(img)
            panels = [disp] + [overlay(disp, m[k]) for k in range(len(names))]
            canvas = titled(
                np.concatenate(panels, axis=1), self._title(Path(path).name, p, dec), ["image", *names]
            )
            self.count += 1
            stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(path).stem)[:80]
            target = self.out_dir / f"{self.count:05d}_{stem}.png"
            Image.fromarray(canvas).save(target)
            written.append(target)
        if self.count == len(written):
            log.info("explanations (%s: %s) -> %s", self.kind, " | ".join(["image", *names]), self.out_dir)
        return written
