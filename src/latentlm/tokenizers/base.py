"""The tokenizer interface: images in [-1, 1] <-> normalized latents.

A tokenizer is the only object that knows the latent normalization ``(z + bias) * scale`` with
``scale = 1 / std(z)`` and ``bias = -mean(z)`` (scalars estimated over many training latents by
``latentlm.tokenizers.normalization``).
Models only ever see normalized latents; no scale constant appears anywhere else.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import torch
from torch import nn


class Tokenizer(nn.Module):
    """Base class. Subclasses implement ``encode_moments`` and ``decode_raw``.

    Attributes:
        latent_channels: C of one latent.
        downsample: spatial factor f; an image of side S gives a latent grid of side S / f.
        kind: short name saved in checkpoints and cache manifests (e.g. "identity", "sigma_vae").
    """

    kind: str = "base"
    latent_channels: int
    downsample: int

    def __init__(self) -> None:
        super().__init__()
        # Normalization stats are buffers so they travel with state_dict; identity until fitted.
        self.register_buffer("scale", torch.tensor(1.0, dtype=torch.float64))
        self.register_buffer("bias", torch.tensor(0.0, dtype=torch.float64))

    # -- subclass API -------------------------------------------------------------------------
    def encode_moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Posterior parameters of raw latents for ``images`` (N, 3, S, S) in [-1, 1].

        Returns ``(mean, std)``, each (N, C, S/f, S/f); ``std`` is None for a deterministic encoder.
        """
        raise NotImplementedError

    def sample_posterior(
        self, mean: torch.Tensor, std: torch.Tensor | None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Draw raw latents from the posterior; subclasses with non-diagonal noise override this."""
        if std is None:
            return mean
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + std * noise

    def decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, S, S) in about [-1, 1] from raw latents (N, C, S/f, S/f)."""
        raise NotImplementedError

    def config_dict(self) -> dict[str, Any]:
        """Constructor arguments, JSON-ready, so the tokenizer can be rebuilt."""
        return {}

    # -- public API -----------------------------------------------------------------------------
    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        """(C, H, W) of the latent for a square image of side ``image_size``."""
        if image_size < 1 or image_size % self.downsample:
            raise ValueError(
                f"image_size={image_size} is not divisible by the tokenizer's downsampling factor "
                f"{self.downsample}; use a multiple of {self.downsample}"
            )
        side = image_size // self.downsample
        return (self.latent_channels, side, side)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents -> what the models see: (z + bias) * scale."""
        return ((z + self.bias) * self.scale).to(z.dtype)

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """Inverse of ``normalize``."""
        return (latents / self.scale - self.bias).to(latents.dtype)

    def encode_raw(
        self, images: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Raw (unnormalized) latents: a posterior sample, or its mode when ``sample`` is False."""
        mean, std = self.encode_moments(images)
        return self.sample_posterior(mean, std, generator) if sample else mean

    def encode(
        self, images: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Normalized latents (N, C, S/f, S/f) for images (N, 3, S, S) in [-1, 1]."""
        return self.normalize(self.encode_raw(images, sample=sample, generator=generator))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (clamped) from normalized latents."""
        return self.decode_raw(self.denormalize(latents)).clamp(-1, 1)

    def set_normalization(self, scale: float, bias: float) -> None:
        if not (math.isfinite(scale) and math.isfinite(bias) and scale > 0):
            raise ValueError(f"invalid normalization scale={scale}, bias={bias}: need finite, scale > 0")
        self.scale.fill_(scale)
        self.bias.fill_(bias)

    def normalization(self) -> dict[str, float]:
        """The stats saved with every checkpoint and latent cache."""
        return {"scale": float(self.scale), "bias": float(self.bias)}

    def fingerprint(self) -> str:
        """Identity of the weights (sha256 over the state dict, normalization excluded)."""
        digest = hashlib.sha256(self.kind.encode())
        for name, tensor in sorted(self.state_dict().items()):
            if name in ("scale", "bias"):
                continue
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()[:16]
