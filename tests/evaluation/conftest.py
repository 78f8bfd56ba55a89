"""Builders for minimal stores and run folders (written in the documented on-disk formats)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cmafnet.data.store import INDEX_COLUMNS, compute_store_hash
from cmafnet.evaluation.evaluate import write_predictions
from cmafnet.evaluation.metrics import classification_metrics
from cmafnet.run import write_json, write_meta


def build_store(
    path: Path,
    *,
    n: int = 24,
    dataset: str = "idc",
    classes: tuple[str, ...] = ("non-IDC", "IDC"),
    subtypes: tuple[str, ...] = (),
    mags: tuple[str, ...] = (),
    size: int = 32,
    seed: int = 0,
) -> Path:
    """A tiny store: random uint8 images, 6 patients, balanced labels."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    np.save(path / "images.npy", images)
    label = np.arange(n) % 2
    sub = [subtypes[(i // 2) % len(subtypes)] if subtypes else "" for i in range(n)]
    if subtypes:  # subtype determines label: first half benign, second half malignant
        label = np.array([int(subtypes.index(s) >= len(subtypes) // 2) for s in sub])
    index = pd.DataFrame(
        {
            "id": [f"img{i}" for i in range(n)],
            "patient": [f"p{i % 6}" for i in range(n)],
            "label": label,
            "label_name": [classes[k] for k in label],
            "subtype": sub,
            "magnification": [mags[i % len(mags)] if mags else "" for i in range(n)],
            "x": 0,
            "y": 0,
            "orig_h": size,
            "orig_w": size,
            "source": [f"src/{i}.png" for i in range(n)],
            "sha256": "0" * 64,
        }
    )[list(INDEX_COLUMNS)]
    index.to_csv(path / "index.csv", index=False)
    meta = {
        "dataset": dataset,
        "classes": list(classes),
        "subtype_classes": list(subtypes),
        "store_hash": compute_store_hash((path / "index.csv").read_bytes(), images.shape),
    }
    (path / "meta.json").write_text(json.dumps(meta))
    return path


def build_evaluated_run(
    path: Path,
    *,
    seed: int = 0,
    n: int = 60,
    classes: tuple[str, ...] = ("non-IDC", "IDC"),
    quality: float = 1.5,
    model: str = "cmafnet",
    imbalance: str | None = None,
) -> Path:
    """A run folder as training + 'cmafnet evaluate' leave it, without weights (report input)."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)
    write_meta(path, {"classes": list(classes), "img_size": 64, "imbalance": imbalance})
    (path / "config.yaml").write_text(f"model:\n  name: {model}\n")
    c = len(classes)
    y = np.arange(n) % c
    logits = rng.normal(size=(n, c)) + quality * np.eye(c)[y]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    index = pd.DataFrame({"id": [f"img{i}" for i in range(n)], "patient": [f"p{i % 7}" for i in range(n)]})
    write_predictions(path / "predictions_test.csv", index, np.arange(n), y, probs, list(classes))
    doc = {
        "name": "test",
        "n": n,
        "classes": list(classes),
        "metrics": classification_metrics(y, probs, 0.5, classes),
    }
    if c == 2:
        doc["operating_point"] = {"value": 0.3, "metrics": classification_metrics(y, probs, 0.3, classes)}
    write_json(path / "metrics_test.json", doc)
    epochs = np.arange(6)
    hist = {
        "epoch": epochs,
        "stage": [1, 1, 2, 2, 3, 3],
        "stage_name": ["branches"] * 2 + ["fusion"] * 2 + ["end_to_end"] * 2,
        "train_loss": 1 / (epochs + 1),
        "val_balanced_accuracy": 0.5 + epochs / 20,
        "lr": 1e-3 * 0.5**epochs,
    }
    for h in range(8):
        hist[f"attn_entropy_h{h}"] = 2.7 + 0.03 * h + 0.01 * epochs
        hist[f"tau_h{h}"] = 1.0 + 0.01 * h * np.ones(6)
    pd.DataFrame(hist).to_csv(path / "metrics.csv", index=False)
    return path


@pytest.fixture
def store_factory(tmp_path):
    def make(name: str = "store", **kw) -> Path:
        return build_store(tmp_path / name, **kw)

    return make


@pytest.fixture
def evaluated_run_factory(tmp_path):
    def make(name: str, **kw) -> Path:
        return build_evaluated_run(tmp_path / name, **kw)

    return make
