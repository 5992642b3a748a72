"""Training batches -> the normalized latents the model sees: one class per kind of data.

A loader batch holds images (an ``ImageFolder``, the digits) or posterior moments (a latent cache,
``CachedLatents``). Both sources draw the same random numbers in the same order from the global
(checkpointed) torch RNG — the horizontal flip, one uniform per item, then the tokenizer's posterior
noise — so a cache of float32 moments trains exactly like the images it was made from.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from latentlm.data.cache import CachedLatents, select_moments
from latentlm.tokenizers import Tokenizer


class ImageSource:
    """Images (N, 3, S, S) in [-1, 1]: flipped at random, then encoded (a posterior sample, or the mode)."""

    def __init__(self, tokenizer: Tokenizer, hflip: bool, sample_posterior: bool) -> None:
        self.tokenizer, self.hflip, self.sample_posterior = tokenizer, hflip, sample_posterior

    @torch.no_grad()
    def latents(self, inputs: Tensor, device: torch.device) -> Tensor:
        images = inputs.to(device, non_blocking=True)
        if self.hflip:
            flip = torch.rand(images.shape[0], device=device) < 0.5  # (N,)
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        return self.tokenizer.encode(images, sample=self.sample_posterior)  # (N, C, h, w)


class MomentSource(ImageSource):
    """A latent cache's posterior moments of each image and of its flip: the flip picks one, then the
    tokenizer samples its posterior (or takes the mode) and normalizes."""

    @torch.no_grad()
    def latents(self, inputs: dict[str, Tensor], device: torch.device) -> Tensor:
        batch = {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
        flip = torch.rand(batch["mean"].shape[0], device=device) < 0.5 if self.hflip else None  # (N,)
        mean, std = select_moments(batch, flip)  # (N, C, h, w); std None for deterministic tokenizers
        z = self.tokenizer.sample_posterior(mean, std) if self.sample_posterior else mean
        return self.tokenizer.normalize(z)


def latent_source(dataset: Dataset, tokenizer: Tokenizer, hflip: bool, sample_posterior: bool) -> Any:
    """The source for ``dataset``'s batches: ``MomentSource`` for a latent cache, else ``ImageSource``."""
    kind = MomentSource if isinstance(dataset, CachedLatents) else ImageSource
    return kind(tokenizer, hflip, sample_posterior)
