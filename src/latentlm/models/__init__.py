"""Model registry: every preset is a ``ModelConfig``; ``build_model(name, **overrides)`` builds it.

The CLI reuses ``list_models()`` as its choices. Unless overridden, paper presets are shaped for
ImageNet 256 with a 16-channel, 16x-downsampling tokenizer (latents 16x16x16, p = 1, 1000 classes).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from latentlm.config import ModelConfig, ProcessConfig, from_dict
from latentlm.models.dit import DiT
from latentlm.models.latentlm import LatentLM

# name -> the ModelConfig fields that differ from its defaults. LatentLM presets use mlp_ratio 6 and a
# 3-block head unless noted; DiT presets mirror the Transformer sizes with mlp_ratio 4.
_PRESETS: dict[str, dict[str, Any]] = {
    "Transformer-Tiny": dict(depth=4, hidden_size=128, num_heads=4, head_depth=2),  # CPU work
    "Transformer-Base": dict(depth=12, hidden_size=768, num_heads=12),
    "Transformer-Medium": dict(depth=24, hidden_size=1024, num_heads=16),  # ≈455M
    "Transformer-Large": dict(depth=24, hidden_size=1536, num_heads=12),  # ≈1.02B
    "Transformer-XL": dict(depth=24, hidden_size=2048, num_heads=16),  # ≈1.82B
    "Transformer-3B": dict(depth=32, hidden_size=2560, num_heads=20),  # ≈3.68B
    # Paper Table 1: 32 blocks of width 1024, 6-block head, FFN 2730 in backbone and head (≈479M).
    "LatentLM-L": dict(depth=32, hidden_size=1024, num_heads=16, head_depth=6, ffn_hidden_size=2730),
    "DiT-Tiny": dict(family="dit", depth=4, hidden_size=128, num_heads=4, mlp_ratio=4.0),
    "DiT-Base": dict(family="dit", depth=12, hidden_size=768, num_heads=12, mlp_ratio=4.0),
    "DiT-Medium": dict(family="dit", depth=24, hidden_size=1024, num_heads=16, mlp_ratio=4.0),
    "DiT-Large": dict(family="dit", depth=24, hidden_size=1536, num_heads=12, mlp_ratio=4.0),
    "DiT-XL": dict(family="dit", depth=24, hidden_size=2048, num_heads=16, mlp_ratio=4.0),
    "DiT-3B": dict(family="dit", depth=32, hidden_size=2560, num_heads=20, mlp_ratio=4.0),
}

_FAMILIES: dict[str, type[nn.Module]] = {"latentlm": LatentLM, "dit": DiT}


def list_models() -> list[str]:
    """Preset names, in registry order."""
    return list(_PRESETS)


def get_config(name: str, **overrides: Any) -> ModelConfig:
    """The preset's ``ModelConfig`` with ``overrides`` applied (``process`` may be a dict or a ProcessConfig)."""
    if name not in _PRESETS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(_PRESETS)}")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown model options {unknown}; known: {sorted(fields - {'name'})}")
    values: dict[str, Any] = {"name": name, **_PRESETS[name], **overrides}
    if isinstance(values.get("process"), dict):
        values["process"] = from_dict(ProcessConfig, values["process"])
    cfg = ModelConfig(**values)
    cfg.validate()
    return cfg


def model_from_config(cfg: ModelConfig) -> nn.Module:
    """Build the model a config describes (e.g. the one saved in a checkpoint)."""
    if cfg.family not in _FAMILIES:
        raise ValueError(f"unknown model family {cfg.family!r}; choose one of: {', '.join(_FAMILIES)}")
    return _FAMILIES[cfg.family](cfg)


def build_model(name: str, **overrides: Any) -> nn.Module:
    """``model_from_config(get_config(name, **overrides))``."""
    return model_from_config(get_config(name, **overrides))


__all__ = ["DiT", "LatentLM", "build_model", "get_config", "list_models", "model_from_config"]
