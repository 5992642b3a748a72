"""latentlm: class-conditional image generation with next-token diffusion (LatentLM) and a DiT baseline.

Importing the package never touches CUDA, and loads no torch until a model or tokenizer is built.
"""

from __future__ import annotations

from typing import Any

from latentlm.config import ModelConfig, ProcessConfig, SamplerConfig
from latentlm.models import build_model, get_config, list_models, model_from_config

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "load_tokenizer":  # the tokenizers import torch: only when asked for
        from latentlm.tokenizers import load_tokenizer

        return load_tokenizer
    raise AttributeError(f"module 'latentlm' has no attribute {name!r}")


__all__ = [
    "ModelConfig",
    "ProcessConfig",
    "SamplerConfig",
    "build_model",
    "get_config",
    "list_models",
    "load_tokenizer",
    "model_from_config",
]
