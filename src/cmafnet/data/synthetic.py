"""SYNTHETIC H&E-like patch datasets for the demo and tests (never mistaken for real data).

Images are composed in optical-density space like real brightfield H&E: an eosin field (pink
stroma with smooth texture and a few pale lumina) plus hematoxylin nuclei (purple blobs), mixed
with each virtual patient's own perturbed stain vectors and intensity, plus sensor noise.
The malignant class (IDC 1 / BreakHis M) has more, larger, darker and more irregular nuclei, so a
small model can learn it. Every root gets a ``SYNTHETIC.txt`` marker, IDC-like patient ids start
with ``syn``, and ingest records ``"synthetic": true`` in the store's meta.

Layouts are those of the real datasets, so generated data goes through the same ingest:
``write_idc_like`` writes the Kaggle IDC layout (50x50), ``write_breakhis_like`` the BreakHis
layout at a reduced size (default 46x70, ingest it with ``--size 46x70``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import zoom

from cmafnet.data.datasets import BreakHis
from cmafnet.data.ingest import SYNTHETIC_MARKER

_H = np.array([0.65, 0.70, 0.29])  # hematoxylin OD direction (Ruifrok & Johnston)
_E = np.array([0.07, 0.99, 0.11])  # eosin


def _patient_stain(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, float]:
    """A virtual patient's stain vectors and overall intensity (slide-to-slide variation)."""
    he = np.stack([_H, _E]) + rng.normal(0, 0.05, (2, 3)).clip(-0.15, 0.15)
    h, e = he / np.linalg.norm(he, axis=1, keepdims=True)
    return h, e, float(rng.uniform(0.8, 1.2))


def _smooth(rng: np.random.Generator, n: int, h: int, w: int, cells: int = 6) -> np.ndarray:
    """Smooth random fields in [0, 1], ``(n, h, w)`` (bilinear upsampling of a coarse grid)."""
    coarse = rng.random((n, cells, cells), dtype=np.float32)
    f = zoom(coarse, (1, h / cells, w / cells), order=1, prefilter=False)
    return f[:, :h, :w]


def render(
    rng: np.random.Generator,
    malignant: np.ndarray,
    h: int,
    w: int,
    stain: tuple[np.ndarray, np.ndarray, float],
    density: float = 1.0,
    difficulty: float = 0.0,
) -> np.ndarray:
    """Render ``len(malignant)`` RGB uint8 patches ``(n, h, w, 3)`` for one patient's stain.

    ``density`` scales the number of nuclei (used to give the BreakHis-like subtypes their own look).
    ``difficulty`` in [0, 1) blends malignant patches toward benign ones: their nucleus count moves
    toward the benign rate and each nucleus looks benign with that probability, so the classes
    overlap and a classifier cannot be perfect (0 = clearly separable).
    """
    if not 0.0 <= difficulty < 1.0:
        raise ValueError(f"difficulty must be in [0, 1), got {difficulty}")
    n = len(malignant)
    hv, ev, gain = stain
    scale = min(h, w) / 50.0
    eos = 0.25 + 0.35 * _smooth(rng, n, h, w)  # (n, h, w) stroma
    lumen = _smooth(rng, n, h, w, cells=4) > 0.82  # pale gaps
    eos = np.where(lumen, eos * 0.15, eos)
    # nuclei of all patches at once, each drawn in its own (2R+1)^2 window and scattered with
    # bincount (overlaps add up, like stacked nuclei)
    m_rate = 14 * density * scale * scale * max(1.0, w / h)
    b_rate = m_rate * 5 / 14
    k = np.maximum(
        1, rng.poisson(np.where(malignant, m_rate + (b_rate - m_rate) * difficulty, b_rate))
    )  # (n,)
    owner = np.repeat(np.arange(n), k)  # (K,)
    kk = len(owner)
    mal = np.asarray(malignant, bool)[owner] & (rng.random(kk) >= difficulty)
    cy, cx = rng.uniform(0, h, kk), rng.uniform(0, w, kk)
    r = np.where(mal, rng.uniform(2.8, 4.5, kk), rng.uniform(1.8, 2.8, kk)) * scale
    ecc = np.where(mal, rng.uniform(1.0, 1.8, kk), rng.uniform(1.0, 1.2, kk))
    ang = rng.uniform(0, np.pi, kk)
    dark = np.where(mal, rng.uniform(1.3, 1.9, kk), rng.uniform(0.8, 1.2, kk))
    phase = rng.uniform(0, 6.3, kk)
    rad = int(np.ceil(4.5 * scale * 1.8 * 1.3))
    off = np.arange(-rad, rad + 1)
    py = np.floor(cy).astype(int)[:, None, None] + off[None, :, None]  # (K, 2R+1, 1)
    px = np.floor(cx).astype(int)[:, None, None] + off[None, None, :]  # (K, 1, 2R+1)
    dy = (py - cy[:, None, None]).astype(np.float32)
    dx = (px - cx[:, None, None]).astype(np.float32)
    ca = np.cos(ang).astype(np.float32)[:, None, None]
    sa = np.sin(ang).astype(np.float32)[:, None, None]
    u, v = dx * ca + dy * sa, -dx * sa + dy * ca  # (K, 2R+1, 2R+1) rotated frame
    d = np.sqrt((u / (r * ecc)[:, None, None]) ** 2 + (v / (r / ecc)[:, None, None]) ** 2)
    # irregular outlines for malignant nuclei: an angular ripple of the radius
    d[mal] *= 1 + 0.18 * np.sin(3 * np.arctan2(v[mal], u[mal]) + phase[mal, None, None])
    blob = dark[:, None, None] / (1 + np.exp(np.minimum((d - 1) * 6, 50)))  # soft-edged ellipse
    py, px = np.broadcast_to(py, blob.shape), np.broadcast_to(px, blob.shape)
    ok = (py >= 0) & (py < h) & (px >= 0) & (px < w)
    flat = (np.broadcast_to(owner[:, None, None], blob.shape) * h + py) * w + px
    hem = (
        np.bincount(flat[ok], weights=blob[ok], minlength=n * h * w)
        .reshape(n, h, w)
        .clip(0, 2.0)
        .astype(np.float32)
    )
    od = (
        gain * (hem[..., None] * hv.astype(np.float32) + eos[..., None] * ev.astype(np.float32)) + 0.03
    )  # (n, h, w, 3)
    rgb = 250 * np.exp(-od) + 3 * rng.standard_normal(od.shape, dtype=np.float32)
    return rgb.clip(0, 255).astype(np.uint8)


def _write_png(path: Path, arr: np.ndarray) -> None:
    Image.fromarray(arr).save(path, compress_level=1)


def _mark(root: Path, what: str) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / SYNTHETIC_MARKER).write_text(
        f"SYNTHETIC data generated by cmafnet.data.synthetic ({what}); not real tissue.\n"
    )


def write_idc_like(
    root: str | Path,
    n_patients: int = 12,
    patches_per_patient: int = 60,
    minority_frac: float = 0.1,
    seed: int = 0,
    difficulty: float = 0.0,
) -> Path:
    """Write a SYNTHETIC dataset in the Kaggle IDC layout and return ``root``.

    ``<root>/<patient>/<0|1>/<patient>_idx5_x<X>_y<Y>_class<C>.png``, 50x50 RGB. Every virtual
    patient has both classes (at least one patch of each); its class-1 fraction varies around
    ``minority_frac`` (x0.3 to x1.7), so patient-level splits stay stratifiable.

    Args:
        n_patients: virtual patients (ids ``syn000``...).
        patches_per_patient: patches per patient (>= 2).
        minority_frac: overall fraction of class-1 (IDC-positive) patches, in (0, 1).
        difficulty: class overlap in [0, 1) (see :func:`render`); 0 keeps the classes separable.
    """
    if not 0 < minority_frac < 1 or patches_per_patient < 2 or n_patients < 1:
        raise ValueError("need 0 < minority_frac < 1, patches_per_patient >= 2, n_patients >= 1")
    root = Path(root)
    _mark(root, "IDC-like")
    rng = np.random.default_rng(seed)
    for p in range(n_patients):
        pid = f"syn{p:03d}"
        frac = minority_frac * rng.uniform(0.3, 1.7)
        n1 = int(np.clip(round(frac * patches_per_patient), 1, patches_per_patient - 1))
        labels = np.zeros(patches_per_patient, bool)
        labels[rng.choice(patches_per_patient, n1, replace=False)] = True
        imgs = render(rng, labels, 50, 50, _patient_stain(rng), difficulty=difficulty)
        cols = int(np.ceil(np.sqrt(patches_per_patient)))
        for c in (0, 1):
            (root / pid / str(c)).mkdir(parents=True, exist_ok=True)
        for i, (img, lab) in enumerate(zip(imgs, labels)):
            x, y = 1 + 50 * (i % cols), 1 + 50 * (i // cols)
            _write_png(root / pid / str(int(lab)) / f"{pid}_idx5_x{x}_y{y}_class{int(lab)}.png", img)
    return root


def write_breakhis_like(
    root: str | Path,
    patients_per_subtype: int = 1,
    images_per_magnification: int = 2,
    size: tuple[int, int] = (46, 70),
    seed: int = 0,
) -> Path:
    """Write a SYNTHETIC dataset in the BreakHis layout and return ``root`` (pass it to ingest).

    ``<root>/BreaKHis_v1/histology_slides/breast/<benign|malignant>/SOB/<subtype>/
    SOB_<B|M>_<code>_<patient>/<mag>X/SOB_<B|M>_<code>-<patient>-<mag>-<idx>.png`` with all 8
    subtypes and 4 magnifications. Images are ``size`` (H, W), 1/10 of the real 460x700 by
    default so it stays fast: ingest with ``--size 46x70``.
    """
    root = Path(root)
    _mark(root, "BreakHis-like")
    rng = np.random.default_rng(seed)
    base = root / "BreaKHis_v1" / "histology_slides" / "breast"
    h, w = size
    serial = 0
    for code in BreakHis.SUBTYPES:
        malignant = BreakHis.SUBTYPES.index(code) >= 4
        bm = "M" if malignant else "B"
        density = 0.7 + 0.2 * (BreakHis.SUBTYPES.index(code) % 4)  # subtypes differ in nuclei density
        for _ in range(patients_per_subtype):
            patient = f"14-{90000 + serial}"  # numeric code as in BreakHis; 'syn' marks it in the root
            serial += 1
            stain = _patient_stain(rng)
            slide = base / ("malignant" if malignant else "benign") / "SOB" / BreakHis.SUBTYPE_FOLDERS[code]
            slide = slide / f"SOB_{bm}_{code}_{patient}"
            for mag in BreakHis.MAGNIFICATIONS:
                (slide / f"{mag}X").mkdir(parents=True, exist_ok=True)
                imgs = render(rng, np.full(images_per_magnification, malignant), h, w, stain, density)
                for i, img in enumerate(imgs, 1):
                    _write_png(slide / f"{mag}X" / f"SOB_{bm}_{code}-{patient}-{mag}-{i:03d}.png", img)
    return root
