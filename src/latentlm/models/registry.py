"""The preset registry: every preset is a ``ModelConfig``; the CLI reuses ``list_models()`` as its choices.

Torch-free, so the command line can resolve presets without importing any model code. Unless
overridden, paper presets are shaped for ImageNet 256 with a 16-channel, 16x-downsampling tokenizer
(latents 16x16x16, p = 1, 1000 classes).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from latentlm.config import ConfigError, ModelConfig, ProcessConfig, from_dict

# name -> the ModelConfig fields that differ from its defaults. LatentLM presets use mlp_ratio 6 and a
# 3-block head unless noted; DiT presets mirror the Transformer sizes with mlp_ratio 4.
PRESETS: dict[str, dict[str, Any]] = {
    "Transformer-Tiny": dict(depth=4, hidden_size=128, num_heads=4, head_depth=2),  # CPU work
    "Transformer-Base": dict(depth=12, hidden_size=768, num_heads=12),
    "Transformer-Medium": dict(depth=24, hidden_size=1024, num_heads=16),  # ≈455M
    "Transformer-Large": dict(depth=24, hidden_size=1536, num_heads=12),  # ≈1.02B
    "Transformer-XL": dict(depth=24, hidden_size=2048, num_heads=16),  # ≈1.82B
    "Transformer-3B": dict(depth=32, hidden_size=2560, num_heads=20),  # ≈3.68B
    # Paper Table 1: 32 blocks of width 1024, 6-block head, FFN 2730 in backbone and head (≈479M).
    "LatentLM-L": dict(depth=32, hidden_size=1024, num_heads=16, head_depth=6, ffn_hidden_size=2730),
    # The reference code's own shapes (models/Transformer.py), beside the names it shares with ours above:
    # B/L/H use mlp_ratio 4 and deeper heads; Transformer-L (32 x 1024, head depth 8, FFN 2688) is not the
    # paper's LatentLM-L (head depth 6, FFN 2730).
    "Transformer-B": dict(depth=24, hidden_size=768, num_heads=12, mlp_ratio=4.0, head_depth=6),
    "Transformer-L": dict(depth=32, hidden_size=1024, num_heads=16, mlp_ratio=4.0, head_depth=8),
    "Transformer-H": dict(depth=40, hidden_size=1280, num_heads=20, mlp_ratio=4.0, head_depth=12),
    "Transformer-7B": dict(depth=32, hidden_size=4096, num_heads=32),
    "Transformer-13B": dict(depth=40, hidden_size=5120, num_heads=40),
    "DiT-Tiny": dict(family="dit", depth=4, hidden_size=128, num_heads=4, mlp_ratio=4.0),
    "DiT-Base": dict(family="dit", depth=12, hidden_size=768, num_heads=12, mlp_ratio=4.0),
    "DiT-Medium": dict(family="dit", depth=24, hidden_size=1024, num_heads=16, mlp_ratio=4.0),
    "DiT-Large": dict(family="dit", depth=24, hidden_size=1536, num_heads=12, mlp_ratio=4.0),
    "DiT-XL": dict(family="dit", depth=24, hidden_size=2048, num_heads=16, mlp_ratio=4.0),
    "DiT-3B": dict(family="dit", depth=32, hidden_size=2560, num_heads=20, mlp_ratio=4.0),
    "DiT-7B": dict(family="dit", depth=32, hidden_size=4096, num_heads=32, mlp_ratio=4.0),  # the reference's
    "DiT-13B": dict(family="dit", depth=40, hidden_size=5120, num_heads=40, mlp_ratio=4.0),  # the reference's
}

# The reference code's preset names (Transformer_models, DiT_models), all of them registered above.
REFERENCE_PRESETS = ("Transformer-13B", "Transformer-7B", "Transformer-3B", "Transformer-XL", "Transformer-Large",
                     "Transformer-Medium", "Transformer-Base", "Transformer-H", "Transformer-L", "Transformer-B",
                     "DiT-13B", "DiT-7B", "DiT-3B", "DiT-XL", "DiT-Large", "DiT-Medium", "DiT-Base")


def list_models() -> list[str]:
    """Preset names, in registry order."""
    return list(PRESETS)


def get_config(name: str, **overrides: Any) -> ModelConfig:
    """The preset's ``ModelConfig`` with ``overrides`` applied (``process`` may be a dict or a ProcessConfig)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model {name!r}; choose one of: {', '.join(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ConfigError(f"unknown model options {unknown}; known: {sorted(fields - {'name'})}")
    values: dict[str, Any] = {"name": name, **PRESETS[name], **overrides}
    if isinstance(values.get("process"), dict):
        values["process"] = from_dict(ProcessConfig, values["process"])
    cfg = ModelConfig(**values)
    cfg.validate()
    return cfg
