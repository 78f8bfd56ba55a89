"""The training data path of a probe (``model.name: probe``): its input scale, and cached embeddings.

``fit`` calls :func:`prepare_probe` once the store, the split and the model are ready. It

1. works out the physical scale the backbone sees (the store's µm/px x patch size / ``model.img_size``),
   warns when it is far from the backbone's native scale, or has the model resample to it
   (``model.probe.match_scale``), and writes that scale and the backbone's weights fingerprint into the
   run's config;
2. with ``model.probe.cache`` (the default), embeds every store image once (:mod:`cmafnet.data.features`,
   keyed by what produced the embeddings), then trains the head on the memory-mapped embeddings: the
   loaders yield ``(B, D)`` embeddings and the preprocessing is the identity. A kNN head is fit here,
   from the training embeddings (no gradient steps).

The extraction's cost is part of the run's cost record: backbone forward MACs per image x the run's
training and validation images, counted for every run that uses the embeddings (a reused cache saves
time, not the compute the comparison charges).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cmafnet.config import Config
from cmafnet.errors import ConfigError
from cmafnet.training import distributed as distr
from cmafnet.training.progress import TrainData

log = logging.getLogger(__name__)

SCALE_TOLERANCE = 1.25  # a backbone seeing its input more than 25% off its native scale is warned about
EXTRACTION_CONVENTION = (
    "backbone forward MACs per image (tiles included) x the run's training + validation images, once, "
    "no backward; counted by every run that uses the embeddings, reused cache or not"
)


@dataclass
class ProbeData:
    """What :func:`prepare_probe` hands back to ``fit``."""

    cfg: Config  # with model.probe.input_mpp and fingerprint recorded
    data: TrainData  # embeddings instead of images when cached
    macs_per_input: int  # forward MACs of one training input (an embedding when cached)
    extraction: dict[str, Any] | None  # the run's extraction cost record, None without a cache


def check_scale(cfg: Config, model: nn.Module, meta: dict) -> float | None:
    """The input's µm/px, set on the model; a warning (raw) or an error (``match_scale``) when unknown or off.

    Raises:
        ConfigError: ``match_scale`` without a known training scale.
    """
    native, probe = model.spec.native_mpp, cfg.model.probe
    store_mpp, hw = meta.get("patch_mpp"), meta.get("patch_hw")
    # the input shows the store's µm/px x stored patch side / model.img_size
    mpp = float(store_mpp) * math.sqrt(hw[0] * hw[1]) / cfg.model.img_size if store_mpp and hw else None
    if probe.match_scale and mpp is None:
        raise ConfigError(
            f"model.probe.match_scale: the training store has no single µm/px ({meta.get('patch_scale_source')}); "
            "ingest it with --mpp"
        )
    model.set_input_mpp(mpp)
    label = model.spec.label
    if mpp is None or native is None:
        log.warning("model.probe: the scale %s sees cannot be checked (input %s um/px, native %s um/px)",
                    label, mpp, native)  # fmt: skip
    elif probe.match_scale:
        log.info("model.probe.match_scale: inputs at %.3g um/px resampled x%.3g to %s's %.3g um/px", mpp,
                 model.zoom, label, native)  # fmt: skip
    elif max(mpp / native, native / mpp) > SCALE_TOLERANCE:
        log.warning(
            "model.probe: %s sees %.3g um/px (store %s um/px, %s px patches shown at %d px) but was trained at "
            "%.3g um/px (x%.2f); set model.probe.match_scale=true to resample to its scale",
            label, mpp, store_mpp, "x".join(map(str, hw)), cfg.model.img_size,
            native, mpp / native,
        )  # fmt: skip
    return mpp


def _key_parts(cfg: Config, model: nn.Module, store: Any, meta: dict) -> dict[str, Any]:
    """Everything the cached embeddings depend on (data.features.cache_key hashes it)."""
    import timm

    d = cfg.data
    backbone = {"fingerprint": model.fingerprint, "arch": model.spec.arch, "kwargs": model.spec.kwargs}
    stain = d.stain.model_dump(mode="json") if d.stain.enabled else None
    return {
        "store_hash": store.store_hash,
        "images": len(store),
        "backbone": {**backbone, "embedding": model.embedding},
        "preprocess": {
            "img_size": cfg.model.img_size,
            "interpolation": d.interpolation,
            "mean": d.mean,
            "std": d.std,
            "stain": stain,
            "stain_reference": meta.get("stain_reference"),
        },
        "zoom": model.zoom,
        "amp": cfg.train.amp,
        "versions": {"torch": torch.__version__, "timm": timm.__version__},
    }


def _check_cached(cfg: Config) -> None:
    if cfg.data.augment.enabled:
        raise ConfigError(
            "data.augment.enabled: cached embeddings are not augmented (eva's protocol); set "
            "data.augment.enabled=false, or model.probe.cache=false to embed augmented images every step"
        )
    if cfg.train.channels_last:
        raise ConfigError(
            "train.channels_last: cached embeddings are (batch, width) vectors; set it to false"
        )


def _extract(
    cfg: Config, model: nn.Module, data: TrainData, store: Any, info: distr.DistInfo, cache_dir: Path
) -> Any:
    """The store's embeddings, extracted on the main rank (the others wait, then read them)."""
    from cmafnet.data.features import load_or_extract
    from cmafnet.data.loader import BatchLoader
    from cmafnet.training.step import autocast_context

    device = info.device
    parts = _key_parts(cfg, model, store, data.meta)
    shape = (len(store), model.num_features)

    def batches() -> Any:
        loader = BatchLoader(store.images, data.labels, np.arange(len(store)), cfg.train.eval_batch_size,
                             device=device)  # fmt: skip
        for x8, _, idx in loader:
            yield idx, data.preprocess_eval(x8)

    def embed(x: torch.Tensor) -> torch.Tensor:
        with autocast_context(device, cfg.train.amp):
            return model.embed_images(x)

    if not info.is_main:
        distr.barrier(info)
    cache = load_or_extract(cache_dir, parts, shape, batches, embed)
    if info.is_main:
        distr.barrier(info)
    return cache


def _macs(model: nn.Module, forward: Any, x: torch.Tensor) -> int:
    """Forward MACs of ``forward(x)``: a pass through ``model`` or one of its methods."""
    from cmafnet.models.complexity import counting

    with counting(model) as counter:
        forward(x)
    return int(counter.get_total_flops() // 2)


def prepare_probe(
    cfg: Config, model: nn.Module, data: TrainData, store_path: str | Path, info: distr.DistInfo
) -> ProbeData:
    """Scale, fingerprint and (cached) embeddings of a probe run.

    Raises:
        ConfigError: a cache with augmentation or channels-last, ``match_scale`` without a known scale.
    """
    from cmafnet.data.features import default_cache_dir
    from cmafnet.data.loader import BatchLoader, as_tensor
    from cmafnet.data.store import PatchStore

    probe, device = cfg.model.probe, info.device
    cfg = cfg.model_copy(deep=True)
    cfg.model.probe.input_mpp = check_scale(cfg, model, data.meta)  # before counting: tiles cost MACs
    cfg.model.probe.fingerprint = model.fingerprint
    image = torch.zeros(1, 3, cfg.model.img_size, cfg.model.img_size, device=device)
    if not probe.cache:  # images every step: the whole forward pass, tiles included
        return ProbeData(cfg, data, _macs(model, model, image), None)
    _check_cached(cfg)
    macs = _macs(model, model.embed_images, image)  # the extraction's, per image
    store = PatchStore.open(store_path, verify=False)  # verified by prepare_data a moment ago
    cache = _extract(cfg, model, data, store, info, Path(probe.cache_dir or default_cache_dir()))
    feats = as_tensor(cache.features)  # float32 (N, D): one copy shared by the head fit and both loaders
    if device.type == "cuda" and feats.nbytes < 0.5 * torch.cuda.mem_get_info(device)[0]:
        feats = feats.to(device)
    resident = feats.device.type == device.type  # else host memory, copied per batch via pinned buffers
    tc = cfg.train
    if probe.head == "knn":
        train = torch.from_numpy(data.train_idx)
        model.head.fit(feats.index_select(0, train.to(feats.device)).to(device),
                       torch.as_tensor(data.labels)[train].to(device))  # fmt: skip
    loaders = {
        True: BatchLoader(feats, data.labels, data.train_idx, tc.batch_size, shuffle=True, seed=tc.seed,
                          device=device, drop_last=True, resident=resident),
        False: BatchLoader(feats, data.labels, data.val_idx, tc.eval_batch_size, device=device,
                           resident=resident),
    }  # fmt: skip

    def make_loader(train: bool, epoch: int, start: int) -> BatchLoader:
        loaders[train].set_epoch(epoch, start)
        return loaders[train]

    n_used = len(data.train_idx) + len(data.val_idx)
    extraction = {
        "images": n_used, "macs_per_image": macs, "macs": n_used * macs, "seconds": round(cache.seconds, 3),
        "reused": cache.reused, "extracted_images": 0 if cache.reused else len(store), "cache": str(cache.folder),
        "key": cache.key, "convention": EXTRACTION_CONVENTION,
    }  # fmt: skip
    identity = lambda x: x  # noqa: E731  (embeddings need no preprocessing)
    data = replace(data, make_loader=make_loader, preprocess_train=identity, preprocess_eval=identity)
    head_macs = _macs(model, model, torch.zeros(1, model.num_features, device=device))  # a training input
    return ProbeData(cfg, data, head_macs, extraction)
