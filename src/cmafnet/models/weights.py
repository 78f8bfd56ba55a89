"""Weight files: reading and writing state dicts, and loading them into CMAF-Net or one of its branches.

Files are read by :func:`load_state_dict_file` (safetensors, or torch with ``weights_only=True``).
Branch files may be timm state dicts (``resnet18``, ``mobilevit_<v>``) or a branch of a saved
CMAF-Net (keys prefixed ``spatial.body.`` / ``contextual.``), so a user can start from timm's
pretrained weights or reuse the extractors of an earlier run. A branch's weights may also be a
pretrained name (``timm:resnet18.a1_in1k``, ``hf-hub:org/repo``), fetched by timm: see
:mod:`cmafnet.models.pretrained`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor, nn

from cmafnet.config import ModelConfig
from cmafnet.errors import ConfigError, RunFolderError
from cmafnet.files import atomic_write_bytes, load_plain_torch_file
from cmafnet.models.pretrained import create_pretrained, load_named_backbone, parse_weights


def save_weights(model: nn.Module, path: str | Path) -> None:
    """Save a state dict as safetensors, atomically."""
    from safetensors.torch import save

    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(path, save(sd))


def load_state_dict_file(path: str | Path) -> dict:
    """Load weights from safetensors, or a torch file with ``weights_only=True`` (no pickled code).

    Raises:
        RunFolderError: a missing, truncated or corrupt file, or one holding pickled objects.
    """
    path = Path(path)
    if not path.exists():
        raise RunFolderError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as err:
            detail = str(err).splitlines()[0].removeprefix("Error while deserializing header: ")[:120]
            raise RunFolderError(f"{path}: corrupt or truncated safetensors file ({detail})") from None
    obj = load_plain_torch_file(path, what="weights file")
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    return obj


def load_strict(
    module: nn.Module,
    sd: dict[str, Tensor],
    what: str,
    error: type[Exception] = ConfigError,
    may_miss: tuple[str, ...] = (),
) -> None:
    """``module.load_state_dict(sd)`` where every key must match (``may_miss``: keys that keep their
    initialisation when absent); a mismatch is one ``error`` line: ``what`` does not fit, and which keys."""
    try:
        missing, unexpected = module.load_state_dict(sd, strict=False)
    except RuntimeError as err:  # a shape mismatch
        raise error(f"{what}: {' '.join(str(err).split())[:300]}") from None
    missing = [k for k in missing if k not in may_miss]
    if missing or unexpected:
        raise error(f"{what} (missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})")


def _strip_prefix(sd: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Keys under ``prefix`` without it when any key has it, else ``sd`` unchanged."""
    if any(k.startswith(prefix) for k in sd):
        return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


def load_branch_weights(branch: nn.Module, path: str | Path, role: str) -> None:
    """Load a file or pretrained name into a branch (``role`` 'spatial' or 'contextual').

    The timm classifier (``fc.*`` / ``head.*``) is ignored; the spatial branch's skip convs and gate,
    and the contextual branch's added embeddings when absent, keep their initialisation.

    Raises:
        ConfigError: the weights do not fit the branch, or a name cannot be fetched.
        RunFolderError: the file is missing or not a plain weights file.
    """
    if role == "spatial":  # timm's features_only ResNet under ``body``
        target, arch, classifier, may_miss = branch.body, branch.backbone, "fc.", ()
    else:
        arch, classifier = f"mobilevit_{branch.variant}", "head."
        target, may_miss = branch, tuple(branch.added_parameter_names())
    name = parse_weights(path)
    if name is not None:
        sd = create_pretrained(name, f"model.{role}.weights", expect_arch=arch, num_classes=0).state_dict()
    else:
        sd = load_state_dict_file(path)
        if not isinstance(sd, dict):
            raise ConfigError(f"{role}.weights: {path} does not hold a state dict")
        sd = _strip_prefix(sd, "spatial.body." if role == "spatial" else "contextual.")
        sd = _strip_prefix(sd, "module.")  # DDP-saved files
    sd = {k: v for k, v in sd.items() if not k.startswith(classifier)}
    load_strict(target, sd, f"{role}.weights: {name or path} does not fit {arch}", may_miss=may_miss)


def load_model_weights(
    model: nn.Module, path: str | Path, backbone: nn.Module | None = None, **timm_kw: Any
) -> None:
    """Load ``model.weights``: a whole-model state dict, strictly (every key must match).

    With a timm ``backbone`` (the baselines'), a file that is not a whole-model state dict is taken as a
    plain timm backbone checkpoint: its classifier keys are dropped and the rest must match the backbone
    exactly (a mismatch is an error, not a silent partial load); and a pretrained name is loaded into the
    backbone by timm, built with ``timm_kw`` (:func:`cmafnet.models.pretrained.load_named_backbone`).

    Raises:
        ConfigError: keys or shapes do not match, or (CMAF-Net: no ``backbone``) ``path`` is a name.
    """
    name = parse_weights(path)
    if name is not None:
        if backbone is None:
            raise ConfigError(
                f"model.weights: {path}: CMAF-Net takes a whole-model file here; pretrained names go to "
                "model.spatial.weights / model.contextual.weights"
            )
        load_named_backbone(backbone, name, "model.weights", **timm_kw)
        return
    sd = load_state_dict_file(path)
    if not isinstance(sd, dict):
        raise ConfigError(f"model.weights: {path} does not hold a state dict")
    sd = _strip_prefix(sd, "module.")
    if backbone is None or set(sd) == set(model.state_dict()):
        load_strict(model, sd, f"model.weights: {path} does not fit the configured model")
        return
    clf = backbone.default_cfg.get("classifier", "fc") if hasattr(backbone, "default_cfg") else "fc"
    clf_prefixes = tuple(f"{c}." for c in ((clf,) if isinstance(clf, str) else clf))
    sd = {k: v for k, v in sd.items() if not k.startswith(clf_prefixes)}
    load_strict(backbone, sd, f"model.weights: {path} matches neither the model nor its backbone")


def without_init_weights(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` with every initial-weights option cleared (a run's own weights replace them anyway).

    Rebuilding a trained model must neither re-read the files nor fetch the names it started from.
    """
    data = cfg.model_dump()
    data["weights"] = None
    data["spatial"]["weights"] = data["contextual"]["weights"] = None
    return ModelConfig.model_validate(data)
