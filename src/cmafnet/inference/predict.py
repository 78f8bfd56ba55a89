"""Patch / image-folder prediction with a trained run.

:class:`Predictor` wraps a loaded run: the run's evaluation preprocessing (stain normalisation,
resize to the model's ``img_size``, mean/std), batched softmax probabilities and the decision at
the run's operating threshold. :func:`predict_files` streams image files through it and writes one
CSV row per input, in input order, with a per-item error or "not assessable" flag where it applies.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cmafnet.data.safety import check_output_dir, check_output_file
from cmafnet.devices import resolve_device
from cmafnet.errors import ConfigError, InputDataError
from cmafnet.inference.adapt import Adaptation, adapt_batchnorm, tta_logits
from cmafnet.inference.explain import Explainer
from cmafnet.inference.io import discover_inputs, iter_images
from cmafnet.inference.preprocess import build_preprocess
from cmafnet.inference.resampling import TOO_LARGE, matching_scale, predict_scaled
from cmafnet.inference.temperature import (
    apply_temperature,
    run_temperature,
    stored_threshold,
)
from cmafnet.inference.tissue import DEFAULT_THRESHOLDS, NOT_ASSESSABLE, TissueThresholds, check_tile
from cmafnet.run import LoadedRun, load_run

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.5


def run_classes(run: LoadedRun) -> list[str]:
    """Class names from run.json, else ``class_0..``."""
    classes = run.meta.get("classes")
    n = run.config.model.num_classes
    if isinstance(classes, (list, tuple)) and len(classes) == n:
        return [str(c) for c in classes]
    return [f"class_{i}" for i in range(n)]


def run_threshold(meta: dict, override: float | None = None) -> tuple[float, str]:
    """The operating threshold on the positive-class probability and where it came from.

    Order: the ``--threshold`` argument, run.json ``threshold`` (chosen on validation for the
    target sensitivity; validated by ``cmafnet.run.RunRecord``), then 0.5 (``default``).
    """
    if override is not None:
        if not 0.0 <= override <= 1.0:
            raise ConfigError(f"--threshold must be in [0, 1], got {override}")
        return float(override), "argument"
    if meta.get("threshold") is not None:
        return float(meta["threshold"]), "run.json:threshold"
    return DEFAULT_THRESHOLD, "default"


@dataclass(frozen=True)
class PredictOptions:
    """How a run predicts: one set of options for ``predict``, ``wsi`` (and its cohorts) and ``evaluate``.

    ``threshold``: the positive-class operating threshold (None: run.json's, else 0.5; ``evaluate``
    reports at 0.5 and at the run's own and does not read it); ``calibrate``: ``auto | on | off``
    (:func:`cmafnet.inference.temperature.run_temperature`); ``fast``: CUDA bf16 autocast,
    channels-last and ``torch.compile``; ``adapt``: stain normalisation, TTA, AdaBN.
    """

    device: str | None = "auto"
    threshold: float | None = None
    calibrate: str = "auto"
    fast: bool = False
    adapt: Adaptation = field(default_factory=Adaptation)
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"--batch must be >= 1, got {self.batch_size}")


def same_size_batches(
    items: Iterable[tuple[Any, np.ndarray]], batch_size: int
) -> Iterator[tuple[list, list]]:
    """``(key, uint8 (H, W, 3) image)`` pairs -> ``(keys, images)`` batches of one image size.

    A size's batch goes when it is full; when ``4 * batch_size`` images wait across sizes the largest
    group goes (memory stays bounded for a folder of mixed sizes); the rest go at the end. Keys come
    back grouped by size, so not always in input order.
    """
    groups: dict[tuple[int, int], list[tuple[Any, np.ndarray]]] = {}
    waiting = 0
    for key, img in items:
        shape = img.shape[:2]
        groups.setdefault(shape, []).append((key, img))
        waiting += 1
        if len(groups[shape]) >= batch_size or waiting >= 4 * batch_size:
            full = groups.pop(
                shape if len(groups[shape]) >= batch_size else max(groups, key=lambda k: len(groups[k]))
            )
            waiting -= len(full)
            yield [k for k, _ in full], [im for _, im in full]
    for full in groups.values():
        yield [k for k, _ in full], [im for _, im in full]


class Predictor:
    """A loaded run ready to predict: model, preprocessing, temperature and operating threshold.

    :meth:`logits_stream` is the one inference loop; ``predict``, ``wsi``, ``evaluate`` and the
    scale-matched evaluation feed it images and turn its logits into their outputs.
    """

    def __init__(self, run: LoadedRun, options: PredictOptions | None = None):
        self.run = run
        self.options = options = options or PredictOptions()
        self.adapt = options.adapt
        self.device = resolve_device(options.device)
        self.model = run.model.to(self.device).eval()
        # --fast (CUDA only): bf16 autocast, channels-last and torch.compile, the bench's inference
        # recipe. Probabilities then differ from fp32 by bf16 rounding. ``self.model`` stays the
        # eager module (the explainer hooks into it).
        self.fast = options.fast and self.device.type == "cuda"
        if options.fast and not self.fast:
            log.warning(
                "--fast applies on CUDA only (bf16, channels-last, compile); %s runs fp32 eager", self.device
            )
        self._forward: Callable[[torch.Tensor], torch.Tensor] = self.model
        if self.fast:
            self.model = self.model.to(memory_format=torch.channels_last)
            self._forward = torch.compile(self.model, dynamic=False)
        self.classes = run_classes(run)
        self.img_size = run.config.model.img_size
        # Probabilities are softmax(logits / T) with the run's validation-fitted temperature (1 when
        # off or never fitted); see cmafnet.inference.temperature.
        self.temperature, self.calibration = run_temperature(run.meta, options.calibrate)
        self.threshold, self.threshold_source = run_threshold(run.meta, options.threshold)
        if self.threshold_source.startswith("run.json"):
            # A stored threshold was chosen at some temperature: the same decisions at ours.
            op = stored_threshold(run.meta, self.temperature)
            self.threshold = op["value"]
            if "mapped_from" in op:
                t_chosen = op["mapped_from"]["temperature"]
                self.threshold_source += f" (chosen at T={t_chosen:.4g}, mapped to T={self.temperature:.4g})"
        if len(self.classes) != 2:
            self.threshold_source = "argmax"  # multi-class: no single operating threshold
        self.preprocess, self._preprocess_desc = build_preprocess(run, self.device, self.adapt.stain)
        self.adabn: dict | None = None  # what adapt_batchnorm did, for the outputs

    @property
    def preprocess_desc(self) -> str:
        """The preprocessing in words, adaptations included (recorded in every output)."""
        tta = f"; TTA {self.adapt.tta} (mean of the views' probabilities)" if self.adapt.tta != "none" else ""
        adabn = (
            f"; AdaBN: {self.adabn['layers']} BatchNorm layers re-estimated on {self.adabn['on']}"
            if self.adabn
            else ""
        )
        return self._preprocess_desc + tta + adabn

    def adapt_batchnorm(self, images: Iterable[np.ndarray], what: str) -> dict:
        """AdaBN: re-estimate the model's BatchNorm statistics on uint8 ``(H, W, 3)`` target images
        (``what`` says which, for the outputs). A model without BatchNorm is left as it is."""
        batches = same_size_batches(((None, im) for im in images), self.options.batch_size)
        self.adabn = {**adapt_batchnorm(self.model, (self.to_input(b) for _, b in batches)), "on": what}
        if not self.adabn["layers"]:
            log.warning("--adabn: the model has no BatchNorm layer; nothing re-estimated")
        return self.adabn

    @classmethod
    def from_run_dir(cls, run_dir: str | Path, options: PredictOptions | None = None) -> Predictor:
        options = options or PredictOptions()
        return cls(load_run(run_dir, device=str(resolve_device(options.device))), options)

    def logits_stream(self, items: Iterable[tuple[Any, np.ndarray]]) -> Iterator[tuple[list, np.ndarray]]:
        """The inference loop: ``(key, uint8 (H, W, 3) image)`` pairs -> ``(keys, logits (B, C))`` per
        batch of ``options.batch_size`` same-size images (:func:`same_size_batches`), uncalibrated
        (:meth:`probs_from_logits` applies the temperature). While a batch is being consumed,
        :meth:`stain_fallback` describes it."""
        for keys, images in same_size_batches(items, self.options.batch_size):
            yield keys, self.logits_from_input(self.to_input(images))

    def to_input(self, images: list[np.ndarray]) -> torch.Tensor:
        """Same-size uint8 ``(H, W, 3)`` images -> normalised model input ``(B, 3, S, S)``."""
        x = torch.from_numpy(np.stack(images)).to(self.device).permute(0, 3, 1, 2).contiguous()  # (B,3,H,W)
        with torch.no_grad():
            return self.preprocess(x)

    @torch.inference_mode()
    def logits_from_input(self, x: torch.Tensor) -> np.ndarray:
        """Uncalibrated logits ``(B, C)`` (float64) of a preprocessed batch (with ``--tta``: the log of
        the mean of the views' probabilities, :func:`cmafnet.inference.adapt.tta_logits`)."""
        if self.adapt.tta != "none":
            logits = tta_logits(self.model, x, self.adapt.tta)  # eager: the views differ in shape under d4
        elif self.fast:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = self._forward(x.contiguous(memory_format=torch.channels_last))  # (B, C)
        else:
            logits = self._forward(x)  # (B, C)
        return logits.float().cpu().numpy().astype(np.float64)

    def probs_from_logits(self, logits: np.ndarray) -> np.ndarray:
        """``softmax(logits / T)`` at the predictor's temperature."""
        return apply_temperature(logits, self.temperature)

    def stain_fallback(self) -> np.ndarray | None:
        """(B,) bool of the last preprocessed batch: images left without stain normalisation
        (too little tissue for Macenko), or None when there is no stain step."""
        fb = getattr(self.preprocess, "last_fallback", None)
        return None if fb is None else fb.detach().cpu().numpy().astype(bool)

    def decide(self, probs: np.ndarray) -> list[str]:
        """Class name per row: positive (index 1) when ``p1 >= threshold`` (binary), else argmax."""
        if len(self.classes) == 2:
            return [self.classes[int(p[1] >= self.threshold)] for p in probs]
        return [self.classes[int(i)] for i in probs.argmax(1)]


@dataclass
class PredictSummary:
    out: Path
    n_inputs: int = 0
    n_predicted: int = 0
    n_not_assessable: int = 0
    n_errors: int = 0
    threshold: float = DEFAULT_THRESHOLD
    threshold_source: str = "default"
    preprocess: str = ""
    explain_dir: Path | None = None
    calibration: str = ""
    scale: str = ""
    errors: list[tuple[str, str]] = field(default_factory=list)  # (path, reason), first few


def predict_files(
    run_dir: str | Path,
    inputs: list[str | Path],
    out_csv: str | Path,
    options: PredictOptions | None = None,
    *,
    tissue_check: bool = True,
    tissue_thresholds: TissueThresholds = DEFAULT_THRESHOLDS,
    explain_dir: str | Path | None = None,
    progress: bool = True,
    mpp: float | None = None,
    aggregate: str = "mean",
) -> PredictSummary:
    """Predict every image in ``inputs`` and write ``out_csv`` (one row per input, input order).

    Images are decoded one at a time and grouped by size into batches (the model's resize happens
    inside the preprocessing, as in training), so memory stays bounded by a few batches. With
    ``mpp`` (the inputs' microns per pixel) every image is instead resampled to the run's training
    scale and tiled with its patch size (:mod:`cmafnet.inference.resampling`), tile probabilities
    aggregated by ``aggregate``; an image smaller than half a patch at that scale is not assessable.
    With ``options.adapt.adabn`` the BatchNorm statistics are re-estimated on every readable input
    first (a second pass over the files).

    Raises:
        ConfigError: ``out_csv`` / ``explain_dir`` is not a usable path, AdaBN with ``mpp``.
        InputDataError: no inputs at all (empty folder), or not a single decodable image.
        RunFolderError: the run folder lacks a config, metadata or model weights.
    """
    options = options or PredictOptions()
    check_output_file(out_csv, "--out")  # before any work: never a traceback after it
    if explain_dir is not None:
        check_output_dir(explain_dir, "--explain")
    items = discover_inputs(inputs)
    if not items:
        raise InputDataError(f"no image files found in {', '.join(map(str, inputs))}")
    if options.adapt.adabn != "off" and mpp is not None:
        raise ConfigError("--adabn re-estimates on the squeezed inputs: it does not go with --input-mpp")
    predictor = Predictor.from_run_dir(run_dir, options)
    if options.adapt.adabn != "off":
        readable = (img for _, img, _ in iter_images(items) if img is not None)
        predictor.adapt_batchnorm(readable, f"the {len(items)} inputs (readable ones)")
    scale = matching_scale(predictor.run.meta, predictor.classes, mpp, aggregate)
    explainer = Explainer(predictor, explain_dir) if explain_dir is not None else None
    out_csv = Path(out_csv)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    summary = PredictSummary(
        out=out_csv, n_inputs=len(items), threshold=predictor.threshold,
        threshold_source=predictor.threshold_source, preprocess=predictor.preprocess_desc,
        explain_dir=Path(explain_dir) if explain_dir else None, calibration=predictor.calibration,
        scale=(f"matched: inputs at {mpp:g} um/px resampled to {scale.describe()}, tiles aggregated by {aggregate}"
               if scale else f"squeezed: each image resized to the model's {predictor.img_size} px input "
               "(pass --input-mpp to match the training scale)"),
    )  # fmt: skip
    classes = predictor.classes
    rows: dict[int, dict[str, Any]] = {}  # rows not written yet (input order: a row waits for earlier ones)
    next_row = 0

    def error(row: dict[str, Any], reason: str) -> None:
        row["status"], row["error"] = "error", reason
        summary.n_errors += 1
        if len(summary.errors) < 20:
            summary.errors.append((row["path"], reason))

    def not_assessable(row: dict[str, Any], flags: str) -> None:
        row["status"] = row["decision"] = NOT_ASSESSABLE
        row["flags"] = ";".join(f for f in (row["flags"], flags) if f)
        summary.n_not_assessable += 1

    def scored(row: dict[str, Any], p: np.ndarray, decision: str) -> None:
        row.update({f"prob_{c}": f"{v:.6f}" for c, v in zip(classes, p)})
        row["decision"], row["status"] = decision, "ok"
        summary.n_predicted += 1

    def flush_ready() -> None:
        nonlocal next_row
        while next_row in rows and rows[next_row]["status"]:
            writer.writerow(rows.pop(next_row))
            next_row += 1

    def to_score() -> Iterator[tuple[tuple[int, np.ndarray], np.ndarray]]:
        """((row, image), image) of the inputs to classify; the others get their row's status here."""
        for i, (path, img, err) in enumerate(iter_images(items)):
            row = rows[i] = {
                "path": str(path), "status": "", "decision": "", "threshold": predictor.threshold,
                "threshold_source": predictor.threshold_source, "flags": "", "error": "",
            }  # fmt: skip
            if img is None:
                error(row, err)
            elif tissue_check:
                tc = check_tile(img, tissue_thresholds)
                row.update(tissue_fraction=f"{tc.tissue_fraction:.4f}", pen_fraction=f"{tc.pen_fraction:.4f}")
                if tc.flags:
                    not_assessable(row, ";".join(tc.flags))
            if not row["status"]:
                row["scale"] = "matched" if scale else "squeezed"
                yield (i, img), img
            bar.update(1)
            flush_ready()

    def squeezed() -> None:
        for keys, logits in predictor.logits_stream(to_score()):
            probs = predictor.probs_from_logits(logits)
            decisions = predictor.decide(probs)
            fallback = predictor.stain_fallback()
            for k, ((i, _), p, dec) in enumerate(zip(keys, probs, decisions)):
                if fallback is not None and fallback[k]:
                    # Informational: classified, but Macenko fell back to the raw colours.
                    rows[i]["flags"] = ";".join(f for f in (rows[i]["flags"], "stain_fallback") if f)
                scored(rows[i], p, dec)
            if explainer is not None:
                explainer.explain([img for _, img in keys], [items[i] for i, _ in keys], probs, decisions)
            flush_ready()

    def matched() -> None:
        pending = to_score()
        while chunk := [key for key, _ in islice(pending, options.batch_size)]:
            res = predict_scaled(predictor, [img for _, img in chunk], [mpp] * len(chunk), scale)
            for (i, img), r in zip(chunk, res):
                rows[i]["n_tiles"] = r.n_tiles
                if r.status == TOO_LARGE:  # past the pixel cap once resampled: an error, like a decoder's
                    error(rows[i], r.error)
                elif r.status:
                    not_assessable(rows[i], f"{NOT_ASSESSABLE}:{r.status}")
                else:
                    p = r.probs(predictor.temperature, aggregate)
                    scored(rows[i], p, predictor.decide(p[None])[0])
                    # maps of the whole image, titled with the tile-aggregated result
                    if explainer is not None:
                        explainer.explain([img], [items[i]], p[None], [rows[i]["decision"]])
            flush_ready()

    from tqdm.auto import tqdm

    tmp = out_csv.with_name(f".{out_csv.name}.partial")
    bar = tqdm(total=len(items), desc="predict", unit="img", disable=not progress)
    try:
        with tmp.open("w", newline="") as f:
            columns = ["path", "status", *[f"prob_{c}" for c in classes], "decision", "threshold", "threshold_source",
                       "tissue_fraction", "pen_fraction", "flags", "scale", "n_tiles", "error"]  # fmt: skip
            writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            matched() if scale is not None else squeezed()
    except BaseException:  # never leave a half-written CSV behind
        tmp.unlink(missing_ok=True)
        raise
    finally:
        bar.close()
    os.replace(tmp, out_csv)
    log.info(
        "wrote %s: %d predicted, %d not assessable, %d errors (threshold %.4g from %s)",
        out_csv, summary.n_predicted, summary.n_not_assessable, summary.n_errors,
        summary.threshold, summary.threshold_source,
    )  # fmt: skip
    if summary.n_predicted + summary.n_not_assessable == 0:
        raise InputDataError(
            f"none of the {len(items)} inputs could be read (reasons per file in {out_csv}; "
            f"first: {summary.errors[0][0]}: {summary.errors[0][1]})"
        )
    return summary
