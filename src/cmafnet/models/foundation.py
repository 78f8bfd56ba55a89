"""Pathology foundation models as data (``foundation.yaml``) and the frozen backbones a probe reads.

``model.probe`` names a backbone: a catalogue entry (``foundation``, see ``cmafnet info --foundation``)
and/or where its weights come from (``backbone``): the entry's Hub repository (the default), a
``timm:`` / ``hf-hub:`` name, a local file, or ``random`` (a seeded random stand-in, for tests and
eva's random-weights baseline). :func:`resolve_backbone` turns that into a :class:`BackboneSpec`;
:func:`build_backbone` builds the timm architecture and loads the weights strictly (a missing tensor is
an error, never a partial load). A gated or unreachable repository is one line saying what is needed.

Embeddings (:func:`embed`): ``cls``, the class token after the final norm; ``cls+mean``, the class
token concatenated with the mean of the patch tokens (register tokens excluded); ``pool``, timm's own
pre-logits pooling.
"""

from __future__ import annotations

import hashlib
import logging
import sys
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cmafnet.config import ProbeConfig, yaml_load
from cmafnet.errors import ConfigError
from cmafnet.models.pretrained import HF_PREFIX, create_pretrained, fetch_error, parse_weights
from cmafnet.registry import suggest

log = logging.getLogger(__name__)

CATALOGUE_FILE = Path(__file__).with_name("foundation.yaml")
RANDOM = "random"  # model.probe.backbone: a seeded random initialisation of the architecture
RANDOM_SEED = 0
EMBEDDINGS = ("cls", "cls+mean", "pool")
HUB_FILES = ("model.safetensors", "pytorch_model.bin")  # what a Hub repository's weights are called


@dataclass(frozen=True)
class FoundationEntry:
    """One catalogue entry (field meanings: the header of ``foundation.yaml``)."""

    key: str
    name: str
    hub: str
    format: str
    arch: str
    kwargs: dict[str, Any]
    embedding: str
    dim: int
    img_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    mpp: float
    mpp_note: str
    licence: str
    gated: bool
    sources: tuple[str, ...]
    unverified: tuple[str, ...] = ()


@cache
def catalogue() -> dict[str, FoundationEntry]:
    """The catalogue, by key (read once). A malformed entry is a packaging bug: ``ValueError``."""
    doc = yaml_load(CATALOGUE_FILE.read_text())
    out = {}
    for key, e in doc.items():
        try:
            out[key] = FoundationEntry(
                key=key, **{**e, "kwargs": dict(e["kwargs"]), "mean": tuple(e["mean"]), "std": tuple(e["std"]),
                            "sources": tuple(e["sources"]), "unverified": tuple(e.get("unverified") or ())},
            )  # fmt: skip
        except (TypeError, KeyError) as err:
            raise ValueError(f"{CATALOGUE_FILE}: entry '{key}' is malformed ({err})") from None
        if out[key].embedding not in EMBEDDINGS:
            raise ValueError(f"{CATALOGUE_FILE}: entry '{key}': embedding must be one of {EMBEDDINGS}")
    return out


def foundation_entry(name: str, option: str = "model.probe.foundation") -> FoundationEntry:
    """The catalogue entry ``name``.

    Raises:
        ConfigError: not in the catalogue (with the nearest name).
    """
    entries = catalogue()
    if name not in entries:
        raise ConfigError(
            f"{option}: '{name}' is not in the foundation-model catalogue.{suggest(name, list(entries))} "
            f"Known: {', '.join(entries)} (cmafnet info --foundation)"
        )
    return entries[name]


def timm_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments for ``timm.create_model`` with layer names (``mlp_layer: SwiGLUPacked``) as classes."""
    import timm.layers

    layers = {"SwiGLUPacked": timm.layers.SwiGLUPacked, "SiLU": nn.SiLU, "GELU": nn.GELU}
    out = dict(kwargs)
    for k in ("mlp_layer", "act_layer"):
        if isinstance(out.get(k), str):
            if out[k] not in layers:
                raise ConfigError(
                    f"model.probe.arch_kwargs.{k}: '{out[k]}' is not one of {', '.join(layers)}"
                )
            out[k] = layers[out[k]]
    return out


@dataclass(frozen=True)
class BackboneSpec:
    """What a probe's backbone is: architecture, weights, embedding and native scale."""

    weights: str  # random | timm:... | hf-hub:... | a local file
    arch: str | None  # timm architecture (None: a timm:/hf-hub: name states it)
    kwargs: dict[str, Any] = field(default_factory=dict)
    embedding: str = "pool"
    native_mpp: float | None = None
    entry: FoundationEntry | None = None

    @property
    def label(self) -> str:
        return self.entry.name if self.entry is not None else (self.arch or self.weights)

    @property
    def from_catalogue_hub(self) -> bool:
        """Weights from the entry's own repository (fetched as a file, loaded by the catalogue's layout)."""
        return self.entry is not None and self.weights == HF_PREFIX + self.entry.hub


def resolve_backbone(probe: ProbeConfig, img_size: int) -> BackboneSpec:
    """``model.probe`` as a :class:`BackboneSpec` (the catalogue's values unless overridden).

    Raises:
        ConfigError: an unknown catalogue name, or a local file / random stand-in without ``arch``.
    """
    entry = foundation_entry(probe.foundation) if probe.foundation else None
    if entry is None and probe.backbone is None:
        raise ConfigError(
            "model.probe: name a foundation model (model.probe.foundation, see cmafnet info --foundation) "
            "or the backbone's weights (model.probe.backbone: timm:..., hf-hub:..., a file, or random)"
        )
    weights = probe.backbone or HF_PREFIX + entry.hub  # type: ignore[union-attr]
    name = parse_weights(weights) if weights != RANDOM else None
    arch = probe.arch or (entry.arch if entry is not None else None)
    if arch is None and name is None:
        raise ConfigError(f"model.probe.arch: the backbone '{weights}' needs its timm architecture")
    kwargs = {**(entry.kwargs if entry is not None else {}), **probe.arch_kwargs}
    if entry is not None and "img_size" not in probe.arch_kwargs:
        kwargs["img_size"] = img_size  # timm resamples the position embeddings when it differs
        if img_size != entry.img_size:
            log.warning("model.img_size %d: %s was trained at %d px", img_size, entry.name, entry.img_size)
    embedding = probe.embedding or (entry.embedding if entry is not None else "pool")
    mpp = probe.native_mpp or (entry.mpp if entry is not None else None)
    return BackboneSpec(weights, arch, kwargs, embedding, mpp, entry)


def _create(arch: str, kwargs: dict[str, Any]) -> nn.Module:
    import timm

    if not timm.is_model(arch):
        raise ConfigError(
            f"model.probe.arch: '{arch}' is not a timm architecture.{suggest(arch, timm.list_models())}"
        )
    try:
        return timm.create_model(arch, pretrained=False, num_classes=0, **timm_kwargs(kwargs))
    except (TypeError, ValueError, AssertionError, RuntimeError) as err:
        raise ConfigError(f"model.probe.arch_kwargs: cannot build {arch} with {kwargs}: {err}") from None


def hub_file(repo: str, option: str, label: str) -> Path:
    """A Hub repository's weights file (``model.safetensors``, else ``pytorch_model.bin``), from the cache
    or downloaded.

    Raises:
        ConfigError: gated, unknown, offline and not cached, or holding neither file (one line each).
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RemoteEntryNotFoundError

    repo_id, _, revision = repo.partition("@")
    offline: Exception | None = None
    for filename in HUB_FILES:
        try:
            return Path(hf_hub_download(repo_id, filename, revision=revision or None))
        except RemoteEntryNotFoundError:
            continue  # the repository has the other file
        except LocalEntryNotFoundError as err:  # offline: maybe the other file is cached
            offline = err
        except Exception as err:  # gated, unknown repository, HTTP errors
            raise fetch_error(option, label, err, repo=repo_id) from None
    if offline is not None:
        raise fetch_error(option, label, offline, repo=repo_id) from None
    raise ConfigError(
        f"{option}: {label} holds neither {' nor '.join(HUB_FILES)}; pass a local weights file: "
        f"--set {option}=/path/to/weights"
    )


def load_backbone_state(backbone: nn.Module, state_dict: dict[str, Tensor], source: str, option: str) -> None:
    """Load a timm or transformers-layout state dict into ``backbone`` strictly (a classifier aside).

    Raises:
        ConfigError: a tensor missing or of another shape.
    """
    from cmafnet.models.hf_vit import is_transformers_layout, transformers_to_timm

    sd = state_dict
    try:
        if is_transformers_layout(sd):
            sd = transformers_to_timm(sd, backbone)
        fit = getattr(sys.modules[type(backbone).__module__], "checkpoint_filter_fn", None)
        if fit is not None:  # timm's own conversions (original DINOv2 names, position-embedding resampling)
            sd = fit(sd, backbone)
    except (ValueError, KeyError, RuntimeError) as err:
        raise ConfigError(f"{option}: {source} does not fit {type(backbone).__name__}: {err}") from None
    classifier = getattr(backbone, "pretrained_cfg", {}).get("classifier", "head")
    own = backbone.state_dict()
    extra = [k for k in sd if k not in own and not k.startswith(f"{classifier}.")]
    missing = [k for k in own if k not in sd]
    wrong = [k for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or extra or wrong:
        raise ConfigError(
            f"{option}: {source} does not fit the backbone (missing {missing[:3]}, unexpected {extra[:3]}, "
            f"other shape {wrong[:3]}); check model.probe.arch / arch_kwargs"
        )
    backbone.load_state_dict({k: sd[k] for k in own})


def build_backbone(spec: BackboneSpec) -> nn.Module:
    """The backbone with its weights (``num_classes=0``: no classifier), in eval mode.

    Raises:
        ConfigError: unknown architecture, weights that do not fit, or weights that cannot be fetched.
    """
    from cmafnet.models.weights import load_state_dict_file

    option = "model.probe.backbone"
    name = parse_weights(spec.weights) if spec.weights != RANDOM else None
    if name is not None and not spec.from_catalogue_hub:  # timm fetches and loads it
        # a copy of a catalogue model may name its arch otherwise
        expect = spec.arch if spec.entry is None else None
        return create_pretrained(
            name, option, expect_arch=expect, num_classes=0, **timm_kwargs(spec.kwargs)
        ).eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)  # a random stand-in is the same network whenever it is rebuilt
        backbone = _create(spec.arch, spec.kwargs)  # type: ignore[arg-type]
    if spec.weights != RANDOM:
        path = (
            hub_file(spec.entry.hub, option, spec.weights) if spec.from_catalogue_hub else Path(spec.weights)
        )  # type: ignore[union-attr]
        if not path.is_file():
            raise ConfigError(
                f"{option}: {path} is not a file (give a weights file, timm:<arch>.<tag>, hf-hub:<org>/<repo> "
                f"or {RANDOM})"
            )
        sd = load_state_dict_file(path)
        if not isinstance(sd, dict):
            raise ConfigError(f"{option}: {path} does not hold a state dict")
        load_backbone_state(backbone, sd, str(path), option)
    return backbone.eval()


def weights_fingerprint(module: nn.Module) -> str:
    """A content hash of ``module``'s tensors (names, dtypes, shapes, bytes)."""
    h = hashlib.blake2b(digest_size=16)
    for k, t in sorted(module.state_dict().items()):
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def embedding_dim(backbone: nn.Module, kind: str) -> int:
    """Width of :func:`embed`'s output."""
    width = int(getattr(backbone, "embed_dim", backbone.num_features))
    return {"cls": width, "cls+mean": 2 * width, "pool": int(backbone.num_features)}[kind]


def embed(backbone: nn.Module, x: Tensor, kind: str) -> Tensor:
    """The embedding ``(B, D)`` of a normalised image batch ``(B, 3, S, S)``.

    Raises:
        ConfigError: ``cls`` / ``cls+mean`` of a backbone without tokens, or ``pool`` that does not pool.
    """
    feats = backbone.forward_features(x)  # ViT: (B, N, C) tokens after the final norm
    if kind == "pool":
        z = backbone.forward_head(feats, pre_logits=True)
    else:
        if feats.ndim != 3:
            raise ConfigError(
                f"model.probe.embedding: '{kind}' needs tokens; this backbone gives {tuple(feats.shape)}"
            )
        n_prefix = int(getattr(backbone, "num_prefix_tokens", 1))  # class token + register tokens
        cls = feats[:, 0]
        z = cls if kind == "cls" else torch.cat([cls, feats[:, n_prefix:].mean(1)], dim=1)
    if z.ndim != 2:
        raise ConfigError(
            f"model.probe.embedding: '{kind}' gives {tuple(z.shape)}, not (batch, width): use cls"
        )
    return z
