"""CMAF-Net: cross-modal attention fusion with information-theoretic regularisation for imbalanced
histopathology classification."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from torch import nn


def create_model(name: Any = "cmafnet", **kwargs: Any) -> nn.Module:
    """Build a registered model by name or from a :class:`cmafnet.config.ModelConfig`."""
    from cmafnet.models import create_model as _create

    return _create(name, **kwargs)


def list_models() -> list[str]:
    """Names of every registered model (CMAF-Net variants and baselines)."""
    from cmafnet.models import list_models as _list

    return _list()


__all__ = ["__version__", "create_model", "list_models"]
