"""latentlm: class-conditional image generation with next-token diffusion (LatentLM) and a DiT baseline.

Importing the package never touches CUDA.
"""

from latentlm.config import ModelConfig, ProcessConfig, SamplerConfig
from latentlm.models import build_model, get_config, list_models, model_from_config
from latentlm.tokenizers import load_tokenizer

__version__ = "0.1.0"

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
