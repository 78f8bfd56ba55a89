"""Whole-slide results as QuPath objects (GeoJSON), importable with *File > Import objects from file*.

QuPath (>= 0.4) reads a GeoJSON ``FeatureCollection`` whose features carry, in ``properties``:

- ``objectType``: ``"annotation"`` (regions) or ``"detection"`` (one per tile);
- ``classification``: ``{"name": ..., "color": [r, g, b]}``. QuPath parses a classification object
  only when it has both a name and a colour, so the colour is always written;
- ``measurements``: ``{name: number}``, shown in QuPath's measurement tables;
- ``name``: the label shown in the viewer.

Coordinates are level-0 pixels with the origin at the top-left corner of the full-resolution
image, as QuPath stores its ROIs. Regions are merged with shapely (valid polygons by
construction); without shapely each tile is its own square. See ``docs/qupath.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

# QuPath's own colours: "Tumor" red for the positive class, "Negative" blue for the other.
POSITIVE_COLOR = (200, 0, 0)
NEGATIVE_COLOR = (112, 112, 225)


def class_colors(classes: Sequence[str], positive: str) -> dict[str, tuple[int, int, int]]:
    """An RGB colour per class name: the positive class red, the others from matplotlib's tab10."""
    import matplotlib

    tab10 = matplotlib.colormaps["tab10"]
    others = [c for c in classes if c != positive]
    colors = {positive: POSITIVE_COLOR}
    for i, name in enumerate(others):
        colors[name] = (
            NEGATIVE_COLOR if len(others) == 1 else tuple(round(v * 255) for v in tab10(i % 10)[:3])
        )
    return colors


def feature(
    geometry: dict[str, Any],
    object_type: str,
    class_name: str,
    color: Sequence[int],
    *,
    name: str | None = None,
    measurements: dict[str, float] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One QuPath object as a GeoJSON Feature (``extra`` properties are kept; QuPath ignores them)."""
    props: dict[str, Any] = {
        "objectType": object_type,
        "classification": {"name": class_name, "color": [int(c) for c in color]},
    }
    if name is not None:
        props["name"] = name
    if measurements:
        props["measurements"] = {k: float(v) for k, v in measurements.items()}
    props.update(extra or {})
    return {"type": "Feature", "geometry": geometry, "properties": props}


def _square(x0: float, y0: float, size: float) -> dict[str, Any]:
    ring = [[x0, y0], [x0 + size, y0], [x0 + size, y0 + size], [x0, y0 + size], [x0, y0]]
    return {"type": "Polygon", "coordinates": [ring]}


def region_annotations(
    rows: list[dict[str, Any]],
    size0: int,
    positive: str,
    prob_key: str,
    color: Sequence[int] = POSITIVE_COLOR,
) -> dict[str, Any]:
    """Annotations for the tiles decided ``positive``, adjacent tiles merged into regions.

    Args:
        rows: classified tiles with level-0 ``x``, ``y`` (top-left), ``decision`` and ``prob_key``.
        size0: tile edge in level-0 pixels.
        positive: the class whose tiles are outlined.
        prob_key: the column with that class's probability.
        color: the classification colour.

    Returns:
        A FeatureCollection; each region has measurements ``n_tiles``, ``mean_prob``, ``max_prob``
        and ``area_px0`` (level-0 square pixels), also kept as plain properties.
    """
    boxes = [(r["x"], r["y"], float(r[prob_key])) for r in rows if r["decision"] == positive]
    try:
        from shapely.geometry import box, mapping
        from shapely.ops import unary_union
    except ImportError:  # pragma: no cover - shapely is in the wsi extra
        regions = [(_square(x, y, size0), [p], float(size0) ** 2) for x, y, p in boxes]
    else:
        merged = unary_union([box(x, y, x + size0, y + size0) for x, y, _ in boxes]) if boxes else None
        polys = [] if merged is None else list(getattr(merged, "geoms", [merged]))
        # each region with the probabilities of the tiles inside it
        inside = [
            [p for x, y, p in boxes if poly.contains(box(x, y, x + size0, y + size0).centroid)]
            for poly in polys
        ]
        regions = [(mapping(poly), ps, poly.area) for poly, ps in zip(polys, inside)]
    features = []
    for i, (geom, ps, area) in enumerate(regions, 1):
        stats = {"n_tiles": len(ps), "mean_prob": float(np.mean(ps)), "max_prob": float(np.max(ps)),
                 "area_px0": float(area)}  # fmt: skip
        name = f"{positive} region {i}"
        features.append(
            feature(geom, "annotation", positive, color, name=name, measurements=stats, extra=stats)
        )
    return {"type": "FeatureCollection", "features": features}


def tile_detections(
    rows: list[dict[str, Any]], size0: int, classes: Sequence[str], colors: dict[str, tuple[int, int, int]]
) -> dict[str, Any]:
    """One detection per classified tile, classified by its decision, with its probabilities.

    Measurements are ``prob_<class>`` for every class (QuPath can colour and filter by them) plus
    the tile's ``tissue_fraction``.
    """
    features = []
    for r in rows:
        m = {f"prob_{c}": float(r[f"prob_{c}"]) for c in classes}
        if r.get("tissue_fraction", "") != "":
            m["tissue_fraction"] = float(r["tissue_fraction"])
        sq = _square(r["x"], r["y"], size0)
        features.append(feature(sq, "detection", r["decision"], colors[r["decision"]], measurements=m))
    return {"type": "FeatureCollection", "features": features}
