"""Pretrained weights by name, and the input normalisation a model's weights state.

A weights option (``model.spatial.weights``, ``model.contextual.weights``, a baseline's
``model.weights``) takes a local file (see :mod:`cmafnet.models.weights`) or a name:

- ``timm:<architecture>[.<tag>]``, a timm pretrained tag such as ``timm:resnet18.a1_in1k``;
- ``hf-hub:<org>/<repo>[@<revision>]``, a timm model on the Hugging Face Hub.

Names are resolved by timm itself (``timm.create_model(..., pretrained=True)``), so files are
downloaded and cached where timm and huggingface_hub cache them (``HF_HOME`` / ``HF_HUB_CACHE``;
``TORCH_HOME`` for the few URL-only weights) and are read from that cache afterwards. A name that
cannot be fetched (no network and no cached copy) is a :class:`~cmafnet.errors.ConfigError`
saying how to pass a local file instead.

The input normalisation (mean/std) comes with the weights: a name's timm ``pretrained_cfg``, or a
local file's own ``config.json`` (timm / Hugging Face layout) or ``config.yaml`` (a cmafnet run
folder) beside it; see :func:`resolve_normalization`.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from torch import nn

from cmafnet.config import Config
from cmafnet.errors import ConfigError
from cmafnet.registry import suggest

log = logging.getLogger(__name__)

HF_PREFIX = "hf-hub:"
# (source, name pattern, the form an error message shows)
_NAME_FORMS = (
    ("timm", r"[\w-]+(\.[\w-]+)?", "timm:<architecture>[.<tag>], e.g. timm:resnet18.a1_in1k"),
    (
        "hf-hub",
        r"[\w.-]+/[\w.-]+(@[\w./-]+)?",
        "hf-hub:<org>/<repo>[@<revision>], e.g. hf-hub:timm/resnet18.a1_in1k",
    ),
)

Norm = tuple[tuple[float, float, float], tuple[float, float, float]]  # (mean, std)


@dataclass(frozen=True)
class WeightsName:
    """A pretrained name: ``timm:resnet18.a1_in1k`` or ``hf-hub:timm/resnet18.a1_in1k``."""

    source: Literal["timm", "hf-hub"]
    name: str  # after the prefix

    @property
    def timm_id(self) -> str:
        """What ``timm.create_model`` takes."""
        return self.name if self.source == "timm" else HF_PREFIX + self.name

    def __str__(self) -> str:
        return f"{self.source}:{self.name}"


def parse_weights(value: str | Path) -> WeightsName | None:
    """The pretrained name in ``value``, or None when it is a local file path.

    Raises:
        ConfigError: a ``timm:`` / ``hf-hub:`` value without a well-formed name.
    """
    text = str(value)
    for source, pattern, form in _NAME_FORMS:
        if text.startswith(f"{source}:"):
            name = text[len(source) + 1 :]
            if not re.fullmatch(pattern, name):
                raise ConfigError(f"weights '{text}': expected {form}")
            return WeightsName(source, name)  # type: ignore[arg-type]
    return None


def fetch_error(
    option: str, label: str | WeightsName, err: Exception, repo: str | None = None
) -> ConfigError:
    """One line: why ``label`` (a weights name) could not be fetched and what to do instead.

    ``repo``: the Hugging Face repository (an ``hf-hub:`` name's own), named in a gated one's licence step.
    """
    if isinstance(label, WeightsName) and label.source == "hf-hub":
        repo = label.name.split("@")[0]
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    local = f"pass a local weights file instead: --set {option}=/path/to/model.safetensors"
    if isinstance(err, GatedRepoError):
        return ConfigError(
            f"{option}: {label} is gated on the Hugging Face Hub: accept its licence at "
            f"https://huggingface.co/{repo or label} with your account, then log in (`hf auth login` or "
            f"HF_TOKEN); or {local}"
        )
    if isinstance(err, LocalEntryNotFoundError):
        why = f"not in the Hugging Face cache {constants.HF_HUB_CACHE}, " + (
            "and HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "and the Hub could not be reached"
        )
    elif isinstance(err, RepositoryNotFoundError):
        why = "no such repository on the Hub, or a private one (log in: `hf auth login` or HF_TOKEN)"
    else:
        why = f"{type(err).__name__}: {' '.join(str(err).split())[:160]}"
    return ConfigError(f"{option}: {label} could not be fetched ({why}); {local}")


def pretrained_config(w: WeightsName, option: str) -> dict[str, Any]:
    """timm's ``pretrained_cfg`` of a name (``architecture``, ``mean``, ``std``, ...).

    ``timm:`` names are looked up in timm's registry (no download); ``hf-hub:`` names read the
    repository's ``config.json`` (downloaded once, then cached).

    Raises:
        ConfigError: unknown architecture or tag, or the configuration cannot be fetched.
    """
    import timm

    if w.source == "timm":
        arch = w.name.split(".", 1)[0]
        if not timm.is_model(arch):
            raise ConfigError(
                f"{option}: '{arch}' is not a timm architecture.{suggest(arch, timm.list_models())}"
            )
        try:
            cfg = timm.get_pretrained_cfg(w.name)
        except RuntimeError:  # timm: "Invalid pretrained tag (...) for <arch>."
            cfg = None
        if cfg is None:
            tags = timm.list_pretrained(f"{arch}.*")
            raise ConfigError(
                f"{option}: timm has no pretrained weights '{w.name}'.{suggest(w.name, tags)} "
                f"Known: {', '.join(tags) or 'none'}"
            )
        return {**cfg.to_dict(), "architecture": arch}
    from timm.models import load_model_config_from_hf

    try:
        cfg, arch, _ = load_model_config_from_hf(w.name)
    except Exception as err:  # offline (LocalEntryNotFoundError), unknown repository, HTTP errors
        raise fetch_error(option, w, err) from None
    return {**cfg, "architecture": arch}


def create_pretrained(
    w: WeightsName, option: str, expect_arch: str | None = None, **kwargs: Any
) -> nn.Module:
    """``timm.create_model(name, pretrained=True, **kwargs)``, checking the architecture first.

    Raises:
        ConfigError: the name is for another architecture, or its weights cannot be fetched.
    """
    import timm

    arch = pretrained_config(w, option)["architecture"]
    if expect_arch is not None and arch != expect_arch:
        raise ConfigError(f"{option}: {w} holds {arch} weights; this model needs {expect_arch}")
    try:
        return timm.create_model(w.timm_id, pretrained=True, **kwargs)
    except Exception as err:  # offline or missing files (OSError), HTTP errors, bad checkpoints
        raise fetch_error(option, w, err) from None


def load_named_backbone(backbone: nn.Module, w: WeightsName, option: str, **kwargs: Any) -> None:
    """Load a pretrained name into a timm backbone (a baseline's), through timm's own loading.

    The source model is built by timm with ``kwargs`` (those the backbone was built with, so timm
    adapts what depends on them, e.g. a ViT's position embeddings to ``img_size``); every backbone
    tensor must be found in it. Keys the backbone lacks (a classifier, layers past a
    ``features_only`` cut) are not used.

    Raises:
        ConfigError: another architecture, a tensor missing or of another shape, or a fetch failure.
    """
    arch = getattr(backbone, "pretrained_cfg", {}).get("architecture")
    kwargs = {"num_classes": 0, **{k: v for k, v in kwargs.items() if k != "pretrained"}}
    source = create_pretrained(w, option, expect_arch=arch, **kwargs).state_dict()
    own = backbone.state_dict()
    missing = [k for k in own if k not in source]
    wrong = [k for k in own if k in source and source[k].shape != own[k].shape]
    if missing or wrong:
        raise ConfigError(
            f"{option}: {w} does not fit {arch} (missing {missing[:3]}, other shape {wrong[:3]})"
        )
    backbone.load_state_dict({k: source[k] for k in own})


# --------------------------------------------------------------------------------- normalisation
def _norm_of(cfg: dict[str, Any]) -> Norm | None:
    mean, std = cfg.get("mean"), cfg.get("std")
    if mean is None or std is None or len(mean) != 3 or len(std) != 3:
        return None
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)  # type: ignore[return-value]


def weights_normalization(weights: str | Path, option: str) -> tuple[Norm, str] | None:
    """(mean, std) the weights were trained with and where that was read, or None if unstated."""
    w = parse_weights(weights)
    if w is not None:
        norm = _norm_of(pretrained_config(w, option))
        return (norm, f"{w} pretrained_cfg") if norm else None
    cfg_json = Path(weights).parent / "config.json"  # timm save_for_hf / Hugging Face snapshot layout
    if cfg_json.is_file():
        try:
            doc = json.loads(cfg_json.read_text())
        except (OSError, ValueError):
            doc = {}
        norm = _norm_of(doc.get("pretrained_cfg", doc)) if isinstance(doc, dict) else None
        if norm:
            return norm, str(cfg_json)
    run_cfg = Path(weights).parent / "config.yaml"  # a cmafnet run folder (e.g. its model.safetensors)
    if run_cfg.is_file():
        from cmafnet.config import load_config

        try:
            data = load_config(run_cfg).data
        except ConfigError:
            return None
        if data.mean is not None and data.std is not None:
            return (data.mean, data.std), str(run_cfg)
    return None


def resolve_normalization(cfg: Config) -> tuple[Config, str]:
    """Fill ``data.mean`` / ``data.std`` left unset (None) from the model's weights.

    Order: a probe's foundation-catalogue entry, the whole-model weights (a probe's backbone), then
    (CMAF-Net) the spatial and the contextual branch's; the first that states a normalisation decides.
    Without any, ImageNet's (timm's defaults). A branch whose weights state another normalisation is
    logged: the one input feeds both branches.

    Returns:
        The config with both set (a copy when anything changed) and where they came from.

    Raises:
        ConfigError: a name is unknown or its configuration cannot be fetched.
    """
    if cfg.data.mean is not None and cfg.data.std is not None:
        return cfg, "data.mean / data.std"
    found: list[tuple[str, Norm, str]] = []
    m = cfg.model
    if m.name == "probe" and m.probe.foundation:
        from cmafnet.models.foundation import foundation_entry

        e = foundation_entry(m.probe.foundation)
        found.append(("model.probe.foundation", (e.mean, e.std), f"foundation catalogue: {e.name}"))
    options = [("model.weights", m.weights)]
    if m.name == "probe" and m.probe.foundation is None and m.probe.backbone != "random":
        options.append(("model.probe.backbone", m.probe.backbone))  # a catalogue entry states its own
    for name in ("spatial", "contextual") if m.name == "cmafnet" else ():
        if getattr(m, name).enabled:
            options.append((f"model.{name}.weights", getattr(m, name).weights))
    for option, value in options:
        got = weights_normalization(value, option) if value else None
        if got is not None:
            found.append((option, *got))
    if found:
        first, norm, where = found[0]
        for option, other, other_where in found[1:]:
            if other != norm:
                log.warning(
                    "%s states mean %s std %s (%s); the one input is normalised as %s states (%s)",
                    option, other[0], other[1], other_where, first, where,
                )  # fmt: skip
    else:  # a model without pretrained weights: ImageNet's
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

        norm = tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)  # type: ignore[assignment]
        where = "timm IMAGENET_DEFAULT_MEAN/STD (no pretrained normalisation)"
    cfg = cfg.model_copy(deep=True)
    if cfg.data.mean is None:
        cfg.data.mean = norm[0]
    if cfg.data.std is None:
        cfg.data.std = norm[1]
    log.info("input normalisation mean %s std %s (%s)", cfg.data.mean, cfg.data.std, where)
    return cfg, where
