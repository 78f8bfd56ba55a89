"""Tissue check on the real histolab TCGA tiles (blank, pen-marked, low-tissue and tissue)."""

from __future__ import annotations

import numpy as np
import pytest

from cmafnet.data.validation import decode_image
from cmafnet.inference.tissue import check_tile

TILES = "unlabeled_he/histolab_he_tiles"
# What the histolab fixture names say the tiles are (and what the images show).
BACKGROUND = ["almost-white-1", "almost-white-2", "no-tissue", "no-tissue2", "no-tissue-line"]
PEN = [
    "no-tissue-green-pen", "no-tissue-red-pen", "medium-nuclei-score-green-pen-level1",
    "high-nuclei-score-red-pen-level1", "very-low-nuclei-score-red-pen-level1",
]  # fmt: skip
LOW_TISSUE = ["high-nuclei-score-level2", "low-nuclei-score-level0", "low-nuclei-score-level1"]
TISSUE = [
    "high-nuclei-score-level0", "medium-nuclei-score-level0", "medium-nuclei-score-level1",
    "medium-nuclei-score-level1-2", "medium-nuclei-score-level2", "very-low-nuclei-score-level0",
    "tissue-level0-4302-10273-4814-10785", "tissue-level0-7352-11762-7864-12274",
    "tissue-level2-1784-6289-5880-10386", "tissue-level2-3000-7666-7096-11763",
    "tissue-level2-4640-4649-8736-8746", "tissue-level2-4760-5241-8856-9338",
]  # fmt: skip


def test_fixture_lists_cover_every_tile(sample_data):
    names = {p.stem for p in (sample_data / TILES).glob("*.png")}
    assert names == set(BACKGROUND + PEN + LOW_TISSUE + TISSUE)


@pytest.mark.parametrize(
    "names,flag",
    [
        (BACKGROUND, "not_assessable:background"),
        (PEN, "not_assessable:pen"),
        (LOW_TISSUE, "not_assessable:low_tissue"),
    ],
)
def test_real_tiles_flagged(sample_data, names, flag):
    for name in names:
        res = check_tile(decode_image(sample_data / TILES / f"{name}.png").array)
        # Pen tiles may also be low on tissue; the others carry exactly their one flag.
        assert (flag in res.flags) if flag.endswith(":pen") else (res.flags == (flag,)), (name, res)


def test_real_tissue_tiles_assessable(sample_data):
    for name in TISSUE:
        res = check_tile(decode_image(sample_data / TILES / f"{name}.png").array)
        assert not res.flags, (name, res)
        assert res.tissue_fraction > 0.5


def test_synthetic_extremes():
    white = np.full((32, 32, 3), 245, np.uint8)
    assert check_tile(white).flags == ("not_assessable:background",)
    ink = np.zeros((32, 32, 3), np.uint8)
    ink[..., 1], ink[..., 2] = 170, 130  # teal marker
    assert check_tile(ink).flags == ("not_assessable:pen",)
    he = np.zeros((32, 32, 3), np.uint8)
    he[...] = (200, 110, 170)  # eosin/haematoxylin-like pink-purple
    assert not check_tile(he).flags
    with pytest.raises(ValueError):
        check_tile(white[..., 0])
