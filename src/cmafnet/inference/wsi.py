"""Whole-slide inference: tissue mask, tiling at the model's patch scale, heatmap and GeoJSON.

Scale: the model was trained on patches of ``tile`` pixels at ``mpp`` microns per pixel. For IDC
(Janowczyk & Madabhushi 2016) the 50x50 patches were cut from 40x slides (~0.25 um/px) downsampled
16x, i.e. ~4 um/px (a "2.5x" view): the default is ``mpp = 4.0``, ``tile = 50``, unless run.json
states ``patch_mpp`` / ``patch_px``. With ``--level`` the slide's own pyramid level is used as is
(no microns needed), tiles of ``--tile`` pixels at that level.

Each grid cell (non-overlapping; partial edge cells are skipped) is read at the pyramid level whose
resolution is the closest finer one, resized to ``tile`` pixels (area averaging), tissue-checked and,
when assessable, classified in batches with the run's preprocessing.

Outputs (in ``out_dir``): ``tiles.csv`` (with each tile's ``category``), ``heatmap.png`` (thumbnail
beside the positive-class probability overlay, with a colour bar marking the threshold and a legend
of the tile categories), ``heatmap_overlay.png`` (the overlay alone, thumbnail-sized),
``thumbnail.png``, ``mask.png`` (tissue mask), ``positive.geojson`` (QuPath annotations in level-0
pixel coordinates: tiles at or above the threshold merged into regions), ``tiles.geojson`` (one
QuPath detection per classified tile, its probabilities as measurements; see
:mod:`cmafnet.inference.qupath`) and ``summary.json``, written last (a folder with it is complete).
The summary counts partition the tiles (:mod:`cmafnet.inference.wsi_figures`): background + not
assessable + classified positive + classified negative = total. It also holds the slide-level numbers
a cohort summary reads: tissue area (thumbnail mask), the tissue area and fraction of the classified
tissue called positive, the mean and top-k positive probability, and the wall time.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cmafnet.data.safety import MAX_PIXELS_ENV, limits, require_regular_file
from cmafnet.data.scale import MPP_RANGE, check_mpp
from cmafnet.errors import ConfigError, InputDataError
from cmafnet.inference import qupath
from cmafnet.inference.predict import PredictOptions, Predictor
from cmafnet.inference.resampling import resize_image, run_scale
from cmafnet.inference.tissue import (
    DEFAULT_THRESHOLDS,
    NOT_ASSESSABLE,
    TissueThresholds,
    check_tile,
    pixel_masks,
)
from cmafnet.inference.wsi_figures import (
    heatmap_figure,
    heatmap_overlay,
    partition,
    partition_line,
    png_bytes,
    slide_scores,
    tile_category,
)
from cmafnet.run import atomic_write_bytes, write_json

log = logging.getLogger(__name__)

IDC_PATCH_PX = 50
MAX_TILES = 1_000_000  # per slide: ~1 GB of per-tile records (0.6 KB measured before prediction)


@dataclass(frozen=True)
class TilePlan:
    """How a slide is cut: level-0 footprint per tile, the level read, the pixel size fed on."""

    level: int  # pyramid level read
    read_px: int  # tile edge in pixels at ``level``
    tile_px: int  # tile edge after resizing (what the predictor gets)
    size0: int  # tile edge in level-0 pixels (grid step)
    cols: int
    rows: int
    mpp: float | None  # microns per pixel of the tiles fed to the model (None if the slide states none)
    source: str  # "mpp" | "level"


def open_slide(path: str | Path) -> Any:
    """Open a slide with OpenSlide; unsupported or missing files raise :class:`InputDataError`."""
    try:
        import openslide
    except ImportError as err:  # pragma: no cover - wsi extra missing
        raise ConfigError(f"whole-slide inference needs openslide-python and openslide-bin ({err})") from None
    path = require_regular_file(path, "slide")  # never a folder, device or FIFO (which would block)
    try:
        return openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError:
        raise InputDataError(
            f"{path}: unsupported slide format (OpenSlide reads Aperio .svs, Hamamatsu .ndpi/.vms, Leica .scn, "
            "MIRAX .mrxs, Philips TIFF, Sakura .svslide, Ventana .bif, generic tiled TIFF, DICOM; "
            "for a plain image of patches use 'cmafnet predict')"
        ) from None
    except openslide.OpenSlideError as err:
        raise InputDataError(f"{path}: slide cannot be read ({err})") from None


def slide_mpp(slide: Any) -> float | None:
    """Level-0 microns per pixel (mean of x and y) if the slide states it."""
    import openslide

    try:
        x = float(slide.properties[openslide.PROPERTY_NAME_MPP_X])
        y = float(slide.properties[openslide.PROPERTY_NAME_MPP_Y])
    except (KeyError, ValueError):
        return None
    return (x + y) / 2 if x > 0 and y > 0 else None


def check_tiling_options(
    *, level: int | None = None, mpp: float | None = None, tile: int | None = None, meta: dict | None = None
) -> None:
    """Refuse tiling options that no slide could satisfy (checked once before a cohort starts).

    Raises:
        ConfigError: both ``level`` and ``mpp``, a tile under 8 pixels, a target scale that is not
            positive, or neither ``mpp`` nor ``level`` for a run whose training scale is unknown.
    """
    if level is not None and mpp is not None:
        raise ConfigError("give either --level or --target-mpp, not both")
    if tile is not None and tile < 8:
        raise ConfigError(f"--tile must be >= 8 pixels, got {tile}")
    if level is None:
        scale = run_scale(meta or {})  # the training scale: one definition for evaluate, predict and wsi
        if mpp is None and scale.mpp is None:
            raise ConfigError(
                f"the run's training scale is unknown ({scale.source}): pass --target-mpp or --level"
            )
        if mpp is not None:
            check_mpp(mpp, "--target-mpp")


def plan_tiling(
    slide: Any,
    *,
    level: int | None = None,
    mpp: float | None = None,
    tile: int | None = None,
    meta: dict | None = None,
) -> TilePlan:
    """Choose the tiling; ``level`` and ``mpp`` are exclusive (``mpp`` is the default path)."""
    meta = meta or {}
    w0, h0 = slide.dimensions
    check_tiling_options(level=level, mpp=mpp, tile=tile, meta=meta)
    base_mpp, scale = slide_mpp(slide), run_scale(meta)
    tile_px = tile or scale.tile_hw[0] or IDC_PATCH_PX
    source = "mpp" if level is None else "level"
    if level is not None:
        if not 0 <= level < slide.level_count:
            raise ConfigError(f"--level {level}: the slide has levels 0..{slide.level_count - 1}")
        ds = float(slide.level_downsamples[level])
        read_px, size0 = tile_px, round(tile_px * ds)
        eff_mpp = base_mpp * ds if base_mpp else None
    else:
        eff_mpp = float(mpp if mpp is not None else scale.mpp)  # check_tiling_options refused an unknown one
        if base_mpp is None:
            raise InputDataError("the slide states no microns per pixel: pass --level L (and --tile PX)")
        if not MPP_RANGE[0] <= base_mpp <= MPP_RANGE[1]:
            raise InputDataError(
                f"the slide states {base_mpp:g} microns per pixel, outside {MPP_RANGE[0]:g} to {MPP_RANGE[1]:g}: "
                "pass --level L (and --tile PX)"
            )
        ds_target = eff_mpp / base_mpp  # level-0 pixels per model pixel
        if ds_target < 1 - 1e-6:
            log.warning(
                "target %.3g um/px is finer than the slide's %.3g um/px: tiles will be upsampled",
                eff_mpp,
                base_mpp,
            )
        size0 = max(1, round(tile_px * ds_target))
        level = slide.get_best_level_for_downsample(max(ds_target, 1.0))
        read_px = max(1, round(size0 / float(slide.level_downsamples[level])))
    plan = TilePlan(level, read_px, tile_px, size0, w0 // size0, h0 // size0, eff_mpp, source)
    if plan.cols == 0 or plan.rows == 0:
        raise InputDataError(
            f"slide {w0}x{h0} px is smaller than one tile ({plan.size0} level-0 px); use a finer --target-mpp or --level"
        )
    # Refuse, before any read, a plan whose tile reads or tile count would not fit in memory.
    cap = limits().max_pixels
    if plan.read_px**2 > cap:
        raise ConfigError(
            f"each tile would be read as {plan.read_px} x {plan.read_px} pixels at level {plan.level}, limit "
            f"{cap:,} ({MAX_PIXELS_ENV}): use a finer --target-mpp, a smaller --tile or --level"
        )
    if plan.cols * plan.rows > MAX_TILES:
        raise ConfigError(
            f"{plan.cols} x {plan.rows} = {plan.cols * plan.rows:,} tiles of {plan.size0} level-0 px, more than "
            f"{MAX_TILES:,}: use a coarser --target-mpp, a larger --tile or --level"
        )
    return plan


def _on_white(rgba: Any) -> np.ndarray:
    """RGB uint8 of an OpenSlide RGBA image: outside-scan areas are transparent, painted white (glass)."""
    from PIL import Image

    bg = Image.new("RGB", rgba.size, (255, 255, 255))
    bg.paste(rgba, mask=rgba.split()[3])
    return np.asarray(bg)


def _read_tile(slide: Any, plan: TilePlan, row: dict) -> np.ndarray:
    """RGB uint8 ``(tile_px, tile_px, 3)`` of one grid cell (a ``tiles.csv`` row)."""
    region = slide.read_region((row["x"], row["y"]), plan.level, (plan.read_px, plan.read_px))
    # Same resampling as scale-matched predict/evaluate: area averaging down, bicubic up.
    return resize_image(_on_white(region), (plan.tile_px, plan.tile_px))


def _thumbnail(slide: Any, plan: TilePlan, max_side: int = 1024) -> tuple[np.ndarray, float]:
    """Thumbnail (RGB uint8) and its downsample from level 0 (at least 4 thumbnail px per tile)."""
    w0, h0 = slide.dimensions
    ds = max(1.0, min(max(w0, h0) / max_side, plan.size0 / 4))
    arr = _on_white(slide.get_thumbnail((max(1, round(w0 / ds)), max(1, round(h0 / ds)))).convert("RGBA"))
    return arr, w0 / arr.shape[1]


@dataclass
class WSISummary:
    slide: str
    out_dir: str
    dimensions: tuple[int, int]
    slide_mpp: float | None
    plan: dict
    n_tiles: int
    n_background: int  # glass on the thumbnail or on the tile
    n_not_assessable: int  # pen / low tissue (background excluded): the four counts sum to n_tiles
    n_positive: int
    n_negative: int
    n_classified: int  # n_positive + n_negative
    n_regions: int
    threshold: float
    threshold_source: str
    calibration: str
    preprocess: str
    partition: dict
    positive_class: str
    tissue_area_mm2: float | None  # tissue on the thumbnail mask (None: the slide states no mpp)
    positive_area_mm2: float | None  # tissue in the tiles classified positive
    positive_fraction: float | None  # of the classified tiles' tissue (None: nothing classified)
    prob_mean: float | None  # mean positive-class probability of the classified tiles
    prob_top_k: float | None  # mean of the top_k highest (fewer when fewer tiles are classified)
    top_k: int
    seconds: float  # wall time of this call, the model load included when it loaded one


def predict_slide(
    run_dir: str | Path,
    slide_path: str | Path,
    out_dir: str | Path,
    options: PredictOptions | None = None,
    *,
    predictor: Predictor | None = None,
    level: int | None = None,
    mpp: float | None = None,
    tile: int | None = None,
    tissue_thresholds: TissueThresholds = DEFAULT_THRESHOLDS,
    progress: bool = True,
    top_k: int = 10,
) -> WSISummary:
    """Tile a slide, classify its tissue tiles and write the heatmap, CSV, GeoJSON and masks.

    ``predictor``: a model already loaded from ``run_dir`` (a cohort loads it once); then ``options``
    are those it was made with and are not read here.
    """
    start = time.perf_counter()
    slide = open_slide(slide_path)  # before loading the model: a bad slide fails fast
    if top_k < 1:
        raise ConfigError(f"--top-k must be >= 1, got {top_k}")
    predictor = predictor or Predictor.from_run_dir(run_dir, options)
    if len(predictor.classes) != 2:
        raise ConfigError("whole-slide heatmaps need a binary run (positive class = index 1)")
    plan = plan_tiling(slide, level=level, mpp=mpp, tile=tile, meta=predictor.run.meta)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    thumb, tds = _thumbnail(slide, plan)
    mask = pixel_masks(thumb, tissue_thresholds)[0]  # (h, w) bool tissue, ink excluded
    positive, name = predictor.classes[1], Path(slide_path).name
    prob_key = f"prob_{positive}"

    rows: list[dict[str, Any]] = []
    todo = []  # the cells to read: enough tissue on the thumbnail
    for r in range(plan.rows):
        for c in range(plan.cols):
            x, y = c * plan.size0, r * plan.size0
            # Tissue fraction of the cell on the thumbnail mask: cheap pre-filter, no slide read.
            ys, ye = int(y / tds), max(int(y / tds) + 1, math.ceil((y + plan.size0) / tds))
            xs, xe = int(x / tds), max(int(x / tds) + 1, math.ceil((x + plan.size0) / tds))
            frac = float(mask[ys:ye, xs:xe].mean()) if mask[ys:ye, xs:xe].size else 0.0
            rows.append({"col": c, "row": r, "x": x, "y": y, "size0": plan.size0, "level": plan.level,
                         "read_px": plan.read_px, "tile_px": plan.tile_px, "thumb_tissue": round(frac, 4),
                         "status": "", "decision": "", "flags": ""})  # fmt: skip
            if frac < tissue_thresholds.background_fraction:
                rows[-1].update(
                    status=NOT_ASSESSABLE, decision=NOT_ASSESSABLE, flags=f"{NOT_ASSESSABLE}:background"
                )
            else:
                todo.append(rows[-1])

    if predictor.adapt.adabn != "off":
        # AdaBN on this slide: BatchNorm statistics re-estimated on its assessable tissue tiles (a first
        # pass over them; the scoring pass reads them again).
        tiles = (_read_tile(slide, plan, row) for row in todo)
        try:
            predictor.adapt_batchnorm(
                (t for t in tiles if not check_tile(t, tissue_thresholds).flags),
                f"the tissue tiles of {name}",
            )
        except ValueError:  # no assessable tile: nothing to re-estimate on (and nothing will be scored)
            log.warning(
                "--adabn: %s has no assessable tissue tile; BatchNorm statistics left as they were", name
            )
    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo), desc="wsi tiles", unit="tile", disable=not progress, leave=False)

    def tissue_tiles() -> Iterator[tuple[dict, np.ndarray]]:  # (row, tile) of the tiles to classify
        for row in todo:
            img = _read_tile(slide, plan, row)
            tc = check_tile(img, tissue_thresholds)
            row.update(tissue_fraction=round(tc.tissue_fraction, 4), pen_fraction=round(tc.pen_fraction, 4))
            if tc.flags:
                row.update(status=NOT_ASSESSABLE, decision=NOT_ASSESSABLE, flags=";".join(tc.flags))
            else:
                yield row, img
            bar.update(1)

    for batch_rows, logits in predictor.logits_stream(tissue_tiles()):
        probs = predictor.probs_from_logits(logits)
        for row, p, dec in zip(batch_rows, probs, predictor.decide(probs)):
            row.update({f"prob_{k}": round(float(v), 6) for k, v in zip(predictor.classes, p)})
            row["status"], row["decision"] = "ok", dec
    bar.close()

    grid = np.full((plan.rows, plan.cols), np.nan)
    for row in rows:
        row["category"] = tile_category(row, positive)
        if row["status"] == "ok":
            grid[row["row"], row["col"]] = row[prob_key]
    cols = ["col", "row", "x", "y", "size0", "level", "read_px", "tile_px", "thumb_tissue", "tissue_fraction",
            "pen_fraction", "status", *[f"prob_{k}" for k in predictor.classes], "decision", "category",
            "flags"]  # fmt: skip
    tiles_csv = out_dir / "tiles.csv"
    tmp = tiles_csv.with_name(".tiles.csv.partial")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    tmp.replace(tiles_csv)
    atomic_write_bytes(out_dir / "thumbnail.png", png_bytes(thumb))
    atomic_write_bytes(out_dir / "mask.png", png_bytes((mask * 255).astype(np.uint8)))
    overlay = heatmap_overlay(thumb, grid, (plan.cols, plan.rows), plan.size0, tds)
    parts = partition(rows, positive)
    atomic_write_bytes(out_dir / "heatmap_overlay.png", png_bytes(overlay))
    calibrated = "calibrated" if predictor.temperature != 1.0 else "uncalibrated"
    figure = heatmap_figure(
        thumb, overlay, title=f"{name}: {partition_line(parts)}", positive=positive,
        threshold=predictor.threshold, calibration=calibrated, counts=parts,
    )  # fmt: skip
    atomic_write_bytes(out_dir / "heatmap.png", figure)
    classified = [r for r in rows if r["status"] == "ok"]
    colors = qupath.class_colors(predictor.classes, positive)
    geo = qupath.region_annotations(classified, plan.size0, positive, prob_key, colors[positive])
    atomic_write_bytes(out_dir / "positive.geojson", (json.dumps(geo) + "\n").encode())
    tiles_geo = qupath.tile_detections(classified, plan.size0, predictor.classes, colors)
    atomic_write_bytes(out_dir / "tiles.geojson", (json.dumps(tiles_geo) + "\n").encode())
    mpp0 = slide_mpp(slide)
    # level-0 pixels per thumbnail pixel (x times y: the thumbnail's rounding differs by axis)
    thumb_px0 = slide.dimensions[0] / thumb.shape[1] * slide.dimensions[1] / thumb.shape[0]
    scores = slide_scores(
        classified, prob_key, positive, top_k=top_k, tile_mm2=(plan.size0 * mpp0 / 1000) ** 2 if mpp0 else None,
        tissue_mm2=float(mask.sum()) * thumb_px0 * mpp0**2 / 1e6 if mpp0 else None,
    )  # fmt: skip
    summary = WSISummary(
        slide=str(slide_path), out_dir=str(out_dir), dimensions=tuple(slide.dimensions), slide_mpp=mpp0,
        plan=asdict(plan), n_tiles=len(rows), n_background=parts["background"],
        n_not_assessable=parts["not assessable"], n_positive=parts["classified positive"],
        n_negative=parts["classified negative"],
        n_classified=parts["classified positive"] + parts["classified negative"], n_regions=len(geo["features"]),
        threshold=predictor.threshold, threshold_source=predictor.threshold_source,
        calibration=predictor.calibration, preprocess=predictor.preprocess_desc, partition=parts,
        positive_class=positive, **scores, top_k=top_k, seconds=round(time.perf_counter() - start, 3),
    )  # fmt: skip
    write_json(out_dir / "summary.json", asdict(summary))
    slide.close()
    return summary
