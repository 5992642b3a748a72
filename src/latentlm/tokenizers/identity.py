"""Pixels as latent tokens (kind ``identity``): a parameter-free tokenizer for tests and runs without a VAE."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from latentlm.tokenizers.base import Tokenizer


class IdentityTokenizer(Tokenizer):
    """Space-to-depth: an f x f RGB patch becomes one latent of 3 f^2 channels (f = 1: raw pixels).

    Deterministic (no posterior noise), exactly invertible.
    """

    kind = "identity"

    def __init__(self, patch: int = 1) -> None:
        super().__init__()
        if patch < 1:
            raise ValueError(f"patch={patch}: must be >= 1")
        self.patch = patch
        self.downsample = patch
        self.latent_channels = 3 * patch * patch

    def encode_moments(self, images: torch.Tensor) -> tuple[torch.Tensor, None]:
        return F.pixel_unshuffle(images, self.patch), None  # (N, 3 f^2, S/f, S/f)

    def decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(z, self.patch)  # (N, 3, S, S)

    def config_dict(self) -> dict[str, Any]:
        return {"patch": self.patch}
