"""The latent normalization: scale = 1/std and bias = -mean of raw latents, fitted once over many images.

One estimator (``LatentMoments``) serves the trainer and the latent cache. It accumulates float64
sums of deviations from a shift (the first batch's mean), so the variance does not cancel when the
latents' mean is large against their spread. ``fit_normalization`` encodes batches of images (the
data layer draws a seeded random subset of the training set: ``latentlm.data.subset_batches``) and
returns the stats of posterior samples, of the posterior mode, or both.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from latentlm.tokenizers.base import Tokenizer


class LatentMoments:
    """Streaming mean and (biased) variance of every value of the raw latent batches fed to ``add``."""

    def __init__(self) -> None:
        self.count = 0
        self.shift: float | None = None
        self.total = 0.0  # Σ (z - shift)
        self.total_sq = 0.0  # Σ (z - shift)²

    def add(self, z: torch.Tensor) -> None:
        z = z.detach().double()
        if self.shift is None:
            self.shift = z.mean().item()
        d = z - self.shift
        self.count += d.numel()
        self.total += d.sum().item()
        self.total_sq += (d * d).sum().item()

    def normalization(self) -> dict[str, float]:
        """``{"scale": 1/std, "bias": -mean}``; ``ValueError`` when the variance is not positive."""
        mean_d = self.total / max(self.count, 1)
        var = self.total_sq / max(self.count, 1) - mean_d * mean_d
        if self.count < 2 or not (math.isfinite(var) and var > 0):
            raise ValueError(f"latent variance {var} over {self.count} values is not positive: the encoder output "
                             "is constant or there are no readable images")
        return {"scale": 1.0 / math.sqrt(var), "bias": -(self.shift + mean_d)}


@torch.no_grad()
def fit_normalization(tokenizer: Tokenizer, images: Iterable[torch.Tensor], device: torch.device, seed: int,
                      kinds: Sequence[str] = ("sample", "mode")) -> dict[str, Any]:
    """Normalization stats of the raw latents of ``images`` (batches (n, 3, S, S) in [-1, 1]):
    ``{kind: {"scale", "bias"}, ..., "images": images used}`` for each of ``kinds``, "sample" (posterior
    samples, noise from a private generator seeded by ``seed``) and/or "mode" (the posterior mean).
    The global RNG is untouched.
    """
    noise = torch.Generator(device).manual_seed(seed)
    moments = {kind: LatentMoments() for kind in kinds}
    used = 0
    for batch in images:
        mean, std = tokenizer.encode_moments(batch.to(device))
        if "mode" in moments:
            moments["mode"].add(mean)
        if "sample" in moments:
            moments["sample"].add(tokenizer.sample_posterior(mean, std, noise))
        used += mean.shape[0]
    return {**{kind: m.normalization() for kind, m in moments.items()}, "images": used}
