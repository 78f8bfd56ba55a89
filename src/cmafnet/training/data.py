"""From a store and a split to what the training loop reads (:class:`~cmafnet.training.progress.TrainData`)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cmafnet.config import Config
from cmafnet.errors import ConfigError, RunFolderError
from cmafnet.training.progress import TrainData


def _preprocess(cfg: Config, device: torch.device, *, train: bool, reference: Any = None) -> Any:
    from cmafnet.data.transforms import GPUPreprocess

    pre = GPUPreprocess(cfg.data, cfg.model.img_size, train=train, stain_reference=reference)
    return pre.to(device) if isinstance(pre, nn.Module) else pre


def reinhard_reference(images: Any, rows: np.ndarray, seed: int, n: int = 256) -> dict | None:
    """The LAB statistics of (up to ``n`` seeded) training patches: the reference ``--stain-norm
    reinhard`` maps target images to (None when they hold too little tissue to measure)."""
    from cmafnet.data.reinhard import reference_stats

    pick = np.sort(np.random.default_rng(seed).permutation(rows)[:n])
    x = torch.from_numpy(np.asarray(images[pick])).permute(0, 3, 1, 2)  # (n, 3, H, W) uint8
    try:
        return reference_stats(x, source=f"{len(pick)} training patches")
    except ValueError:
        return None


def _stain_reference(pre: Any) -> Any:
    for name in ("stain_reference", "reference"):
        ref = getattr(pre, name, None)
        if ref is not None:
            return ref.tolist() if isinstance(ref, torch.Tensor | np.ndarray) else ref
    return None


def prepare_data(
    cfg: Config, store_path: str | Path, split_path: str | Path, device: torch.device
) -> TrainData:
    """Open the store and split, apply the training-only undersampling, build loaders and preprocessing.

    Raises:
        RunFolderError: store or split missing or mismatched.
        ConfigError: the model's class count does not match the split's targets.
    """
    from cmafnet.data.loader import BatchLoader
    from cmafnet.data.sampling import undersample_to_ratio
    from cmafnet.data.splits import load_split
    from cmafnet.data.store import PatchStore

    store = PatchStore.open(store_path)
    split = load_split(split_path, store)
    labels, classes = store.targets(split.label_kind)
    if cfg.model.num_classes != len(classes):
        raise ConfigError(
            f"model.num_classes: {cfg.model.num_classes}, but the split's '{split.label_kind}' targets have "
            f"{len(classes)} classes {classes}"
        )
    train_idx = np.asarray(split.train, np.int64)
    if cfg.data.imbalance is not None:
        try:
            train_idx = undersample_to_ratio(train_idx, labels, cfg.data.imbalance, cfg.train.seed)
        except ValueError as err:
            raise ConfigError(f"data.imbalance: {err}") from None
    for name, idx in (("train", train_idx), ("val", split.val)):
        if len(idx) == 0:
            raise RunFolderError(f"{split_path}: the {name} split is empty")
    # One copy of the uint8 images shared by both loaders: on the GPU when asked and it fits.
    images: Any = store.images
    resident = None
    if device.type == "cuda":
        fits = store.images.nbytes < 0.5 * torch.cuda.mem_get_info(device)[0]
        if cfg.data.device_cache and fits:
            images = torch.from_numpy(np.array(store.images)).to(device)  # one host copy, then on the GPU
        resident = bool(cfg.data.device_cache and fits)
    tc = cfg.train
    train_loader = BatchLoader(
        images, labels, train_idx, tc.batch_size, shuffle=True, seed=tc.seed, device=device, drop_last=True,
        resident=resident,
    )  # fmt: skip
    val_loader = BatchLoader(
        images, labels, split.val, tc.eval_batch_size, shuffle=False, device=device, resident=resident
    )

    def make_loader(train: bool, epoch: int, start: int) -> Any:
        loader = train_loader if train else val_loader
        loader.set_epoch(epoch, start)
        return loader

    pre_train = _preprocess(cfg, device, train=True)
    stain_reference = _stain_reference(pre_train)
    pre_eval = _preprocess(cfg, device, train=False, reference=stain_reference)
    split_bytes = Path(split_path).read_bytes()
    from cmafnet.data.scale import store_scale

    mpp, hw, scale_source = store_scale(store, train_idx)
    meta = {
        "store_hash": store.store_hash,
        "split_hash": hashlib.sha256(split_bytes).hexdigest(),
        "split_bytes": split_bytes,
        "stain_reference": stain_reference,
        "reinhard_reference": reinhard_reference(store.images, train_idx, cfg.train.seed),
        "dataset": store.dataset,
        "synthetic": bool(store.meta.get("synthetic", False)),
        "label_kind": split.label_kind,
        # the physical scale the model learns (inference on other data resamples to it)
        "patch_mpp": mpp,
        "patch_hw": [int(hw[0]), int(hw[1])],
        "patch_px": int(hw[0]) if hw[0] == hw[1] else None,
        "patch_scale_source": scale_source,
    }
    return TrainData(
        make_loader, train_idx, np.asarray(split.val, np.int64), labels, classes, pre_train, pre_eval, meta
    )
