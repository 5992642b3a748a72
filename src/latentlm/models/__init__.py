"""Models: LatentLM (causal Transformer + per-token diffusion head) and the DiT baseline.

``build_model(name, **overrides)`` builds a preset of the registry (``list_models()``); a checkpoint's
saved ``ModelConfig`` is rebuilt with ``model_from_config``. Importing this package loads no model
code (the registry is torch-free); the classes are imported when a model is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from latentlm.config import ConfigError, ModelConfig
from latentlm.models.registry import get_config, list_models

if TYPE_CHECKING:
    from torch import nn


def model_from_config(cfg: ModelConfig) -> nn.Module:
    """Build the model a config describes (e.g. the one saved in a checkpoint)."""
    if cfg.family == "latentlm":
        from latentlm.models.latentlm import LatentLM

        return LatentLM(cfg)
    if cfg.family == "dit":
        from latentlm.models.dit import DiT

        return DiT(cfg)
    raise ConfigError(f"unknown model family {cfg.family!r}; choose one of: latentlm, dit")


def build_model(name: str, **overrides: Any) -> nn.Module:
    """``model_from_config(get_config(name, **overrides))``."""
    return model_from_config(get_config(name, **overrides))


__all__ = ["build_model", "get_config", "list_models", "model_from_config"]
