"""σ-VAE tokenizer (LatentLM, Sun et al. 2024, §2.3): a VAE whose encoder predicts only the mean.

The posterior is not a learned diagonal Gaussian. For an image with encoder mean μ (C, h, w)
a latent is drawn as

    z = μ + s · ε,    s ~ N(0, C_σ²) one scalar per image,    ε ~ N(0, I) per element,

so every image gets noise of a random overall strength, and the decoder must cope with
latents anywhere from clean to very noisy: this keeps the latent space's variance from
collapsing, which is what makes it easy for the next-token diffusion head to model.
Training minimises, per image, Σ_pixels (x − x̂)² + ``prior_weight`` · Σ_latents μ² (the prior term on
μ, weight 1e-2), divided by the number of pixel values so the loss reads as a per-pixel MSE. Sums,
as in a VAE's ELBO, keep the weight's meaning independent of image and latent size; in means the
prior's weight is ``prior_weight`` · (latent values / pixel values), e.g. 1e-2 / 6 for the digits'
(8, 4, 4) latents of (3, 16, 16) images, 1e-2 / 48 for (16, 16, 16) latents of 256x256 images.

C_σ: the paper's value is 0.75 and that is our default (``noise_std``). The reference code
divides its configured std by 0.8 before drawing s (an effective C_σ of 0.9375 for 0.75); we
follow the paper and expose the number, so ``noise_std=0.9375`` reproduces the reference.

Interface choice: ``encode_moments`` returns ``(μ, std)`` with ``std`` of shape (N, 1, 1, 1)
filled with C_σ — the scale of the per-image noise scale, not a per-element posterior std.
``sample_posterior`` reads it that way, so latent caches that store (mean, std) and sample at
train time reproduce the σ-VAE noise exactly; only (N, 1, 1, 1) extra values are stored.

Two variants share the class: ``conv`` (a small convolutional encoder/decoder for small images
such as the 16x16 digits; downsampling ``2^(len(channel_mult) - 1)``) and ``vit`` (patch
embedding + Transformer encoder and decoder for ImageNet-size images; downsampling
``patch_size``).

Checkpoints: one self-describing safetensors file whose metadata ``config`` is JSON (kind,
constructor arguments, normalization stats) — see :func:`save_sigma_vae` / :func:`load_sigma_vae`.
``load_sigma_vae`` also reads a torch file ``{"config": {...}, "model": state_dict}`` with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from latentlm.config import SigmaVAEConfig
from latentlm.io import atomic_write
from latentlm.models.layers import sincos_2d
from latentlm.tokenizers.base import Tokenizer

CHECKPOINT_NAME = "tokenizer.safetensors"  # file name inside a tokenizer directory
FORMAT_TAG = "latentlm.sigma_vae.v1"


class PerImageScaleTokenizer(Tokenizer):
    """A σ-VAE's posterior: z = μ + s·ε, s = std·N(0, 1) drawn once per image, ε ~ N(0, I) like μ.

    ``encode_moments`` returns ``std`` as the scale of s per image, (N, 1, 1, 1) (of a larger (N, ...) only
    the first value per image is read); ``sample_posterior`` with ``std`` None gives the mode μ. s is drawn
    before ε, both from ``generator``. Shared by our σ-VAE and the reference code's.
    """

    def sample_posterior(
        self, mean: torch.Tensor, std: torch.Tensor | None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        if std is None:
            return mean
        n = mean.shape[0]
        s = torch.randn((n, 1, 1, 1), generator=generator, device=mean.device, dtype=mean.dtype)
        s = s * std.reshape(n, -1)[:, :1].reshape(n, 1, 1, 1).to(mean.dtype)  # (N, 1, 1, 1)
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + s * eps  # (N, C, h, w)


# ---------------------------------------------------------------------------------------------
# Conv variant
# ---------------------------------------------------------------------------------------------


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=math.gcd(32, channels), num_channels=channels, eps=1e-6)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv3x3, twice, plus a (1x1 when widths differ) skip. (N, Ci, H, W) -> (N, Co, H, W)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class ConvEncoder(nn.Module):
    """(N, image_channels, S, S) -> μ (N, C, S/f, S/f), f = 2^(levels - 1), stride-2 convs between levels."""

    def __init__(self, cfg: SigmaVAEConfig) -> None:
        super().__init__()
        widths = [cfg.base_channels * m for m in cfg.channel_mult]
        self.conv_in = nn.Conv2d(cfg.image_channels, widths[0], 3, padding=1)
        layers: list[nn.Module] = []
        ch = widths[0]
        for level, width in enumerate(widths):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResBlock(ch, width))
                ch = width
            if level < len(widths) - 1:
                layers.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))  # halve H and W
        layers.append(ResBlock(ch, ch))
        self.blocks = nn.Sequential(*layers)
        self.norm_out = _group_norm(ch)
        self.conv_out = nn.Conv2d(ch, cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.conv_in(x))  # (N, widths[-1], S/f, S/f)
        return self.conv_out(F.silu(self.norm_out(h)))  # (N, C, S/f, S/f)


class ConvDecoder(nn.Module):
    """z (N, C, h, w) -> images (N, image_channels, h·f, w·f); nearest upsampling + conv between levels."""

    def __init__(self, cfg: SigmaVAEConfig) -> None:
        super().__init__()
        widths = [cfg.base_channels * m for m in cfg.channel_mult][::-1]
        ch = widths[0]
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch, 3, padding=1)
        layers: list[nn.Module] = [ResBlock(ch, ch)]
        for level, width in enumerate(widths):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResBlock(ch, width))
                ch = width
            if level < len(widths) - 1:
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, ch, 3, padding=1)]
        self.blocks = nn.Sequential(*layers)
        self.norm_out = _group_norm(ch)
        self.conv_out = nn.Conv2d(ch, cfg.image_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.conv_in(z))  # (N, base_channels·mult[0], S, S)
        return self.conv_out(F.silu(self.norm_out(h)))  # (N, image_channels, S, S)


# ---------------------------------------------------------------------------------------------
# ViT variant
# ---------------------------------------------------------------------------------------------


class ViTBlock(nn.Module):
    """Pre-norm Transformer block with bidirectional SDPA attention and a GELU MLP. (N, L, D) -> (N, L, D)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, dim = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(n, length, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (N, heads, L, D/heads)
        attn = F.scaled_dot_product_attention(q, k, v)  # (N, heads, L, D/heads)
        x = x + self.proj(attn.transpose(1, 2).reshape(n, length, dim))  # (N, L, D)
        return x + self.mlp(self.norm2(x))


class ViTEncoder(nn.Module):
    """(N, image_channels, S, S) -> μ (N, C, S/p, S/p): patchify, Transformer, per-token Linear to C."""

    def __init__(self, cfg: SigmaVAEConfig) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(cfg.image_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        self.blocks = nn.ModuleList(ViTBlock(cfg.hidden_size, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm_out = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.proj_out = nn.Linear(cfg.hidden_size, cfg.latent_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.patch_embed(x)  # (N, D, h, w)
        n, d, side, _ = h.shape
        h = h.flatten(2).transpose(1, 2) + sincos_2d(side, d).to(h.device, h.dtype)  # (N, L, D), L = h·w
        for block in self.blocks:
            h = block(h)
        z = self.proj_out(self.norm_out(h))  # (N, L, C)
        return z.transpose(1, 2).reshape(n, -1, side, side)  # (N, C, h, w)


class ViTDecoder(nn.Module):
    """z (N, C, h, w) -> images (N, image_channels, h·p, w·p): per-token Linear to D, Transformer, unpatchify."""

    def __init__(self, cfg: SigmaVAEConfig) -> None:
        super().__init__()
        self.patch_size = cfg.patch_size
        self.proj_in = nn.Linear(cfg.latent_channels, cfg.hidden_size)
        self.blocks = nn.ModuleList(ViTBlock(cfg.hidden_size, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm_out = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.proj_out = nn.Linear(cfg.hidden_size, cfg.image_channels * cfg.patch_size**2)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        n, _, side, _ = z.shape
        h = self.proj_in(z.flatten(2).transpose(1, 2))  # (N, L, D)
        h = h + sincos_2d(side, h.shape[-1]).to(h.device, h.dtype)
        for block in self.blocks:
            h = block(h)
        patches = self.proj_out(self.norm_out(h))  # (N, L, image_channels·p²)
        patches = patches.transpose(1, 2).reshape(n, -1, side, side)  # (N, image_channels·p², h, w)
        return F.pixel_shuffle(patches, self.patch_size)  # (N, image_channels, h·p, w·p)


# ---------------------------------------------------------------------------------------------
# The tokenizer
# ---------------------------------------------------------------------------------------------


class SigmaVAE(PerImageScaleTokenizer):
    """σ-VAE tokenizer: deterministic encoder mean μ, per-image scalar-scaled Gaussian noise.

    ``SigmaVAE(**tokenizer.config_dict())`` rebuilds the architecture; ``SigmaVAE(cfg)`` takes a
    ``SigmaVAEConfig``; keyword arguments override its fields.
    """

    kind = "sigma_vae"

    def __init__(self, config: SigmaVAEConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        cfg = dataclasses.replace(config or SigmaVAEConfig(), **overrides)
        cfg.channel_mult = tuple(cfg.channel_mult)  # JSON gives a list
        cfg.validate()
        self.config = cfg
        self.latent_channels = cfg.latent_channels
        self.downsample = cfg.downsample
        if cfg.variant == "conv":
            self.encoder: nn.Module = ConvEncoder(cfg)
            self.decoder: nn.Module = ConvDecoder(cfg)
        else:
            self.encoder = ViTEncoder(cfg)
            self.decoder = ViTDecoder(cfg)

    @property
    def noise_std(self) -> float:
        """C_σ: the std of the per-image noise scale s."""
        return self.config.noise_std

    def encode_moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(μ (N, C, S/f, S/f), std (N, 1, 1, 1) filled with C_σ)`` for images (N, 3, S, S) in [-1, 1]."""
        side = images.shape[-1]
        if images.shape[-2] != side or side % self.downsample:
            raise ValueError(
                f"image of shape {tuple(images.shape)}: the σ-VAE needs square images whose side is a multiple "
                f"of its downsampling factor {self.downsample}"
            )
        mean = self.encoder(images)  # (N, C, S/f, S/f)
        std = torch.full((mean.shape[0], 1, 1, 1), self.noise_std, device=mean.device, dtype=mean.dtype)
        return mean, std

    def decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, h·f, w·f), unclamped, from raw latents (N, C, h, w)."""
        return self.decoder(z)

    def config_dict(self) -> dict[str, Any]:
        cfg = dataclasses.asdict(self.config)
        cfg["channel_mult"] = list(cfg["channel_mult"])
        return cfg

    def loss(
        self, images: torch.Tensor, prior_weight: float = 1e-2, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Training loss for images (N, 3, S, S) in [-1, 1]: (Σ (x − x̂)² + ``prior_weight`` · Σ μ²) per
        image over its number of pixel values, averaged over the batch; x̂ decodes a posterior sample.

        Returns ``(scalar loss, {"recon": pixel MSE, "prior": mean μ²} as detached scalar tensors)``.
        """
        mean, std = self.encode_moments(images)  # (N, C, h, w), (N, 1, 1, 1)
        z = self.sample_posterior(mean, std, generator)  # (N, C, h, w)
        recon = F.mse_loss(self.decode_raw(z), images)
        prior = mean.pow(2).mean()
        ratio = mean[0].numel() / images[0].numel()  # latent values per pixel value
        return recon + prior_weight * ratio * prior, {"recon": recon.detach(), "prior": prior.detach()}

    def forward(
        self, images: torch.Tensor, prior_weight: float = 1e-2
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training loss (so DDP wrappers see a forward call); see ``loss``."""
        return self.loss(images, prior_weight=prior_weight)


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def checkpoint_config(tokenizer: SigmaVAE) -> dict[str, Any]:
    """The JSON ``config`` saved with the weights: kind, constructor arguments, normalization."""
    return {"kind": tokenizer.kind, **tokenizer.config_dict(), "normalization": tokenizer.normalization()}


def save_sigma_vae(tokenizer: SigmaVAE, path: str | os.PathLike) -> Path:
    """Write ``tokenizer`` to one self-describing safetensors file, atomically.

    ``path`` is a ``.safetensors`` file or a directory (then ``<dir>/tokenizer.safetensors``).
    The file's metadata holds ``format`` and ``config`` (JSON); the tensors are the state dict,
    normalization buffers included. Written to a temporary file, fsynced and renamed, so a crash
    mid-write leaves any previous file intact.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        path.mkdir(parents=True, exist_ok=True)
        path = path / CHECKPOINT_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tokenizer.state_dict().items()}
    metadata = {"format": FORMAT_TAG, "config": json.dumps(checkpoint_config(tokenizer))}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    return path


def _build_from_config(config: dict[str, Any]) -> tuple[SigmaVAE, dict[str, float] | None]:
    config = dict(config)
    kind = config.pop("kind", SigmaVAE.kind)
    if kind != SigmaVAE.kind:
        raise ValueError(f"checkpoint config has kind={kind!r}; load_sigma_vae reads kind 'sigma_vae' only")
    normalization = config.pop("normalization", None)
    known = {f.name for f in dataclasses.fields(SigmaVAEConfig)}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"unknown σ-VAE config fields {unknown}; known: {sorted(known)}")
    return SigmaVAE(**config), normalization


def is_sigma_vae_config(config: Any) -> bool:
    """Whether a file's ``"config"`` is one of ours: kind 'sigma_vae', or no kind and only our field names."""
    if not isinstance(config, dict):
        return False
    if "kind" in config:
        return config["kind"] == SigmaVAE.kind
    return set(config) <= {f.name for f in dataclasses.fields(SigmaVAEConfig)} | {"normalization"}


def load_sigma_vae(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> SigmaVAE:
    """Rebuild a ``SigmaVAE`` (weights and normalization) from a checkpoint, in eval mode.

    Accepts a ``.safetensors`` file written by :func:`save_sigma_vae`, a directory containing
    ``tokenizer.safetensors``, or a torch file ``{"config": {...}, "model": state_dict}`` (read
    with ``torch.load(weights_only=True)``; never unpickles arbitrary objects).
    """
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no σ-VAE checkpoint at {path}; train one with `latentlm train-tokenizer`")
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            if "config" not in metadata:
                raise ValueError(f"{path}: a safetensors file without 'config' metadata is not a σ-VAE checkpoint")
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        config = json.loads(metadata["config"])
    else:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(blob, dict) or "config" not in blob or "model" not in blob:
            raise ValueError(f"{path}: expected a dict with 'config' and 'model' entries (a σ-VAE torch checkpoint)")
        config, state = blob["config"], blob["model"]
    tokenizer, normalization = _build_from_config(config)
    missing, unexpected = tokenizer.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in ("scale", "bias")]  # older files may keep stats in config only
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the config: missing {missing}, unexpected {unexpected}")
    if normalization is not None and ("scale" not in state or "bias" not in state):
        tokenizer.set_normalization(float(normalization["scale"]), float(normalization["bias"]))
    return tokenizer.to(map_location).eval()
