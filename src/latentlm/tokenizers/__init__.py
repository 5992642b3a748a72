"""Tokenizers: images in [-1, 1] <-> normalized latents."""

from latentlm.tokenizers.base import Tokenizer
from latentlm.tokenizers.identity import PatchTokenizer

__all__ = ["PatchTokenizer", "Tokenizer"]
