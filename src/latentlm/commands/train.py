"""``latentlm train``: train a LatentLM or DiT model (``latentlm.training.model``)."""

from __future__ import annotations

from latentlm.config import TrainConfig
from latentlm.training.loop import EXIT_INTERRUPTED
from latentlm.training.model import train


def run(cfg: TrainConfig) -> int:
    return EXIT_INTERRUPTED if train(cfg).interrupted else 0
