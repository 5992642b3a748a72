"""``latentlm train-tokenizer``: train a σ-VAE tokenizer (``latentlm.training.tokenizer``)."""

from __future__ import annotations

from latentlm.config import TokenizerTrainConfig
from latentlm.training.loop import EXIT_INTERRUPTED
from latentlm.training.tokenizer import train_tokenizer


def run(cfg: TokenizerTrainConfig) -> int:
    return EXIT_INTERRUPTED if train_tokenizer(cfg).interrupted else 0
