"""Model registry: CMAF-Net (and its ablation variants, as configs) plus the paper's baselines."""

from __future__ import annotations

from typing import Any

from torch import nn

from cmafnet.config import ModelConfig
from cmafnet.errors import ConfigError
from cmafnet.models.output import ModelOutput
from cmafnet.registry import Registry

# A factory takes a validated ModelConfig and returns an nn.Module following the model contract
# (docs/architecture.md).
MODELS: Registry = Registry("model")


def _register_builtin() -> None:
    # Imported for their @MODELS.register side effects.
    from cmafnet.models import baselines, cmafnet, fusion_baselines, probe  # noqa: F401


def create_model(name: str | ModelConfig = "cmafnet", **overrides: Any) -> nn.Module:
    """Build a model from a registry name or a ``ModelConfig``; keyword overrides are config fields.

    Example: ``create_model("cmafnet", img_size=96, contextual={"variant": "xxs"})``.
    """
    _register_builtin()
    cfg = name
    if not isinstance(name, ModelConfig) or overrides:
        base = name.model_dump() if isinstance(name, ModelConfig) else {"name": name}
        try:
            cfg = ModelConfig.model_validate({**base, **overrides})
        except Exception as err:  # pydantic.ValidationError
            raise ConfigError(f"model: {err}") from None
    return MODELS.get(cfg.name)(cfg)


def list_models() -> list[str]:
    _register_builtin()
    return MODELS.names()


__all__ = ["MODELS", "ModelOutput", "create_model", "list_models"]
