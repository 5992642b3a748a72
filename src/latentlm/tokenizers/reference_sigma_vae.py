"""σ-VAE files of the reference LatentLM code (microsoft/unilm, ``LatentLM/``), with its numerics.

The reference saves a σ-VAE as ``torch.save({"config": config, "model": state_dict})``, where
``config`` holds the arguments of its ``sigma_vae(**config)``: ``img_size``, ``patch_size``,
``latent_size``, ``std``, ``encoder_arch`` (``vit-base`` or ``beit3-base``) and ``decoder_arch``
(``vit-base``). :class:`ReferenceSigmaVAE` rebuilds that network with the reference's exact
state-dict keys (in its order) and forward pass; :func:`load_reference_sigma_vae` reads such a file.
It is a different network from our own :class:`~latentlm.tokenizers.sigma_vae.SigmaVAE`.

The network (ViT-B width: 768 wide, 12 blocks of 12 heads, MLP 3072; about 172M parameters):

* ``vit-base`` encoder and the decoder: a pre-norm ViT in BEiT's layout — class token, learned
  absolute positions, a query and value bias but no key bias (``attn.q_bias``, ``attn.v_bias``
  beside a bias-free ``attn.qkv``), exact GELU, LayerNorm eps 1e-6, a last LayerNorm ``fc_norm``
  over every token; the patch tokens (class token dropped) come out.
* ``beit3-base`` encoder: torchscale's BEiT-3 vision encoder — class token (and an unused mask
  token), learned positions read from row 2 on (fairseq's offset), Magneto sub-LayerNorm blocks
  (a LayerNorm after the attention heads, ``inner_attn_ln``, and after the MLP's GELU,
  ``ffn_layernorm``), LayerNorm eps 1e-5 and a last LayerNorm. Its patch is always 16 pixels.
  As in torchscale, its softmax and GELU run in float32 and are cast back: in float64 the outputs
  then carry float32 roundings, as the reference's do; in float32 the casts change nothing.
* Heads: the encoder's ``Linear(768, latent_size)`` per patch gives μ (N, latent_size, H/p, W/p);
  the decoder reads μ's grid as an image with patch 1 and ends per token in Linear → Tanh →
  Linear to the token's p x p x 3 pixels.

Posterior (the reference's ``GaussianDistribution.sample``): the encoder predicts μ only and a
latent is z = μ + s·ε with one s ~ N(0, (std / 0.8)²) per image and ε ~ N(0, I) per element.
Our σ-VAE draws s ~ N(0, C_σ²) with C_σ = ``noise_std`` itself (the paper's 0.75). So here
``encode_moments`` returns std / 0.8 (0.9375 for the usual std 0.75) as the (N, 1, 1, 1) scale,
and sampling is the same code as ours (``latentlm.tokenizers.sigma_vae.PerImageScaleTokenizer``).

Why our own modules, not timm or torchscale (the reference's dependencies): the reference's ViT
is its own BEiT-style class, not timm's ``VisionTransformer`` (whose keys are ``attn.qkv.bias``
and ``norm``); timm's ``Beit`` comes close in keys but pools before its ``fc_norm`` and changes
its attention internals between releases. torchscale's last release (0.3.0, 2023) pins
fairscale 0.4.0 and timm 0.6.13, and swaps in apex's LayerNorm when apex is installed. The
blocks are a few standard torch ops, so writing them here keeps the key layout exact, matches the
goldens in ``fixtures/official_sigma_vae/`` to float64 rounding (without torchscale's float32
casts the BEiT-3 μ would be off by about 1e-7), adds no dependency and no import time.

Weights take the file's floating dtype (the reference saves float32); normalization is identity
until fitted, as for every tokenizer here: the reference file carries no latent scale.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from latentlm.tokenizers.sigma_vae import PerImageScaleTokenizer

CONFIG_KEYS = ("img_size", "patch_size", "latent_size", "std", "encoder_arch", "decoder_arch")
REQUIRED_CONFIG_KEYS = ("latent_size", "std")  # the reference's sigma_vae() has no default for these
ENCODER_ARCHS = ("vit-base", "beit3-base")
DECODER_ARCHS = ("vit-base",)
POSTERIOR_STD_DIVISOR = 0.8  # the reference draws s ~ N(0, (std / 0.8)^2)

# ViT-B, the only width the reference builds (its get_basic_config); the BEiT-3 patch is fixed too.
WIDTH, DEPTH, HEADS, MLP_WIDTH = 768, 12, 12, 3072
BEIT3_PATCH = 16
VIT_LN_EPS, BEIT3_LN_EPS = 1e-6, 1e-5
BEIT3_POSITION_OFFSET = 2  # fairseq's padding offset: token i reads position row i + 2


@dataclass
class ReferenceSigmaVAEConfig:
    """The reference's ``sigma_vae(**config)`` arguments; defaults are its own."""

    latent_size: int  # C of one latent token
    std: float  # the configured noise std; the per-image scale s has std / 0.8 (see module docstring)
    img_size: int = 256  # the one image side the network takes (learned positions fix it)
    patch_size: int = 16  # pixels per side of one latent token (the downsampling factor)
    encoder_arch: str = "beit3-base"  # "vit-base" or "beit3-base" (the reference's default)
    decoder_arch: str = "vit-base"  # the only decoder the reference has

    @property
    def grid(self) -> int:
        """Side of the latent grid."""
        return self.img_size // self.patch_size

    def validate(self) -> None:
        """Raise ``ValueError`` naming the bad field and what is allowed."""
        for name in ("img_size", "patch_size", "latent_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}: must be an integer >= 1")
        if isinstance(self.std, bool) or not isinstance(self.std, int | float) or not 0 <= self.std < math.inf:
            raise ValueError(f"std={self.std!r}: must be a finite number >= 0")
        if self.encoder_arch not in ENCODER_ARCHS:
            raise ValueError(f"encoder_arch={self.encoder_arch!r}: must be one of {', '.join(ENCODER_ARCHS)}")
        if self.decoder_arch not in DECODER_ARCHS:
            raise ValueError(f"decoder_arch={self.decoder_arch!r}: must be one of {', '.join(DECODER_ARCHS)}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size={self.img_size} is not a multiple of patch_size={self.patch_size}")
        if self.encoder_arch == "beit3-base" and self.patch_size != BEIT3_PATCH:
            raise ValueError(f"patch_size={self.patch_size}: the reference's beit3-base encoder always uses "
                             f"{BEIT3_PATCH}-pixel patches, so its files have patch_size={BEIT3_PATCH}")

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> ReferenceSigmaVAEConfig:
        """Validated config from a file's ``"config"``; ``ValueError`` names a missing or unknown key."""
        if not isinstance(config, Mapping):
            raise ValueError(f"a reference σ-VAE config is a dict, not a {type(config).__name__}")
        missing = [k for k in REQUIRED_CONFIG_KEYS if k not in config]
        unknown = sorted(str(k) for k in config if k not in CONFIG_KEYS)
        if missing or unknown:
            raise ValueError(f"reference σ-VAE config with keys {sorted(str(k) for k in config)}: missing "
                             f"{missing}, unknown {unknown}; it takes {list(CONFIG_KEYS)} "
                             f"({' and '.join(REQUIRED_CONFIG_KEYS)} required)")
        cfg = cls(**config)
        cfg.validate()
        return cfg


def is_reference_sigma_vae_config(config: Any) -> bool:
    """Whether a file's ``"config"`` is the reference's: a dict with ``latent_size`` and ``std``.

    Those two have no default in the reference's ``sigma_vae`` and never appear in ours (whose
    config names ``latent_channels`` and ``noise_std``), so they tell the two formats apart;
    the rest of the config is checked when the tokenizer is built.
    """
    return isinstance(config, Mapping) and all(k in config for k in REQUIRED_CONFIG_KEYS) and "kind" not in config


# ---------------------------------------------------------------------------------------------
# The reference's ViT ("vit-base"): encoder, and decoder with patch 1 over the latent grid
# ---------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens: (N, Ci, S, S) -> (N, (S/p)², D)."""

    def __init__(self, in_chans: int, dim: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, D, S/p, S/p) -> (N, T, D)


class ViTAttention(nn.Module):
    """Multi-head self-attention with query and value biases and no key bias (BEiT's choice)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))  # (3D,)
        qkv = F.linear(x, self.qkv.weight, bias)  # (N, T, 3D)
        q, k, v = qkv.reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (N, h, T, D/h)
        out = F.scaled_dot_product_attention(q, k, v)  # (N, h, T, D/h)
        return self.proj(out.transpose(1, 2).reshape(n, t, d))  # (N, T, D)


class ViTMlp(nn.Module):
    """Linear -> exact GELU -> Linear, per token."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # (N, T, D)


class ViTBlock(nn.Module):
    """Pre-norm block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=VIT_LN_EPS)
        self.attn = ViTAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=VIT_LN_EPS)
        self.mlp = ViTMlp(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))  # (N, T, D)
        return x + self.mlp(self.norm2(x))  # (N, T, D)


class ReferenceViT(nn.Module):
    """The reference's ViT: (N, in_chans, S, S) -> patch tokens (N, (S/p)², D), class token dropped."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int) -> None:
        super().__init__()
        tokens = (img_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, WIDTH))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens + 1, WIDTH))  # class token first
        self.patch_embed = PatchEmbed(in_chans, WIDTH, patch_size)
        self.blocks = nn.ModuleList(ViTBlock(WIDTH, HEADS, MLP_WIDTH) for _ in range(DEPTH))
        self.fc_norm = nn.LayerNorm(WIDTH, eps=VIT_LN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # (N, T, D)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed  # (N, 1 + T, D)
        for block in self.blocks:
            x = block(x)  # (N, 1 + T, D)
        return self.fc_norm(x)[:, 1:]  # (N, T, D)


# ---------------------------------------------------------------------------------------------
# torchscale's BEiT-3 vision encoder ("beit3-base")
# ---------------------------------------------------------------------------------------------


class BEiT3VisionEmbed(nn.Module):
    """16 x 16 patches -> tokens with a class token first: (N, 3, S, S) -> (N, 1 + (S/16)², D).

    ``mask_token`` (masked image modelling) is part of the reference's weights but unused here.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.proj = nn.Conv2d(3, dim, kernel_size=BEIT3_PATCH, stride=BEIT3_PATCH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x).flatten(2).transpose(1, 2)  # (N, T, D)
        return torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)  # (N, 1 + T, D)


class BEiT3Attention(nn.Module):
    """Self-attention with separate biased q/k/v projections and a LayerNorm over the heads' output."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.inner_attn_ln = nn.LayerNorm(dim, eps=BEIT3_LN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        head = d // self.heads
        # Scale q before the product and take softmax in float32, as torchscale does.
        q = (self.q_proj(x) * head**-0.5).reshape(n, t, self.heads, head).transpose(1, 2)  # (N, h, T, D/h)
        k = self.k_proj(x).reshape(n, t, self.heads, head).transpose(1, 2)  # (N, h, T, D/h)
        v = self.v_proj(x).reshape(n, t, self.heads, head).transpose(1, 2)  # (N, h, T, D/h)
        weights = torch.softmax(q @ k.transpose(-2, -1), dim=-1, dtype=torch.float32).to(q.dtype)  # (N, h, T, T)
        out = (weights @ v).transpose(1, 2).reshape(n, t, d)  # (N, T, D)
        return self.out_proj(self.inner_attn_ln(out))  # (N, T, D)


class BEiT3FeedForward(nn.Module):
    """Linear -> exact GELU (in float32, as torchscale) -> LayerNorm -> Linear, per token."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.ffn_layernorm = nn.LayerNorm(hidden, eps=BEIT3_LN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)  # (N, T, hidden)
        h = F.gelu(h.float()).to(h.dtype)  # (N, T, hidden)
        return self.fc2(self.ffn_layernorm(h))  # (N, T, D)


class BEiT3Layer(nn.Module):
    """Pre-norm sub-LayerNorm block: x + attn(LN(x)), then x + ffn(LN(x))."""

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.self_attn = BEiT3Attention(dim, heads)
        self.self_attn_layer_norm = nn.LayerNorm(dim, eps=BEIT3_LN_EPS)
        self.ffn = BEiT3FeedForward(dim, hidden)
        self.final_layer_norm = nn.LayerNorm(dim, eps=BEIT3_LN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x))  # (N, T, D)
        return x + self.ffn(self.final_layer_norm(x))  # (N, T, D)


class BEiT3Encoder(nn.Module):
    """Learned positions (offset 2), the layers and a last LayerNorm: (N, T, D) -> (N, T, D)."""

    def __init__(self, tokens: int) -> None:
        super().__init__()
        self.embed_positions = nn.Embedding(tokens + BEIT3_POSITION_OFFSET, WIDTH)
        self.layers = nn.ModuleList(BEiT3Layer(WIDTH, HEADS, MLP_WIDTH) for _ in range(DEPTH))
        self.layer_norm = nn.LayerNorm(WIDTH, eps=BEIT3_LN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        positions = self.embed_positions.weight[BEIT3_POSITION_OFFSET: BEIT3_POSITION_OFFSET + x.shape[1]]  # (T, D)
        x = x + positions  # (N, T, D)
        for layer in self.layers:
            x = layer(x)  # (N, T, D)
        return self.layer_norm(x)  # (N, T, D)


class ReferenceBEiT3Vision(nn.Module):
    """torchscale's BEiT-3 vision encoder: (N, 3, S, S) -> patch tokens (N, (S/16)², D), class token dropped."""

    def __init__(self, img_size: int) -> None:
        super().__init__()
        self.vision_embed = BEiT3VisionEmbed(WIDTH)
        self.encoder = BEiT3Encoder(1 + (img_size // BEIT3_PATCH) ** 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.vision_embed(x))[:, 1:]  # (N, T, D)


# ---------------------------------------------------------------------------------------------
# Heads and the tokenizer
# ---------------------------------------------------------------------------------------------


class EncodeHead(nn.Module):
    """Patch tokens (N, h·w, D) -> μ (N, C, h, w), one Linear per token."""

    def __init__(self, latent_size: int, grid: int) -> None:
        super().__init__()
        self.grid = grid
        self.dense = nn.Linear(WIDTH, latent_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dense(x)  # (N, h·w, C)
        return x.reshape(x.shape[0], self.grid, self.grid, -1).permute(0, 3, 1, 2)  # (N, C, h, w)


class DecodeHead(nn.Module):
    """Decoder tokens (N, h·w, D) -> images (N, 3, h·p, w·p): Linear -> Tanh -> Linear to each p x p patch."""

    def __init__(self, patch_size: int, grid: int) -> None:
        super().__init__()
        self.patch_size, self.grid = patch_size, grid
        self.fc1 = nn.Linear(WIDTH, WIDTH)
        self.fc2 = nn.Linear(WIDTH, 3 * patch_size * patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, g, p = x.shape[0], self.grid, self.patch_size
        x = self.fc2(torch.tanh(self.fc1(x)))  # (N, h·w, 3·p·p), channel-major within a patch
        x = x.reshape(n, g, g, 3, p, p).permute(0, 3, 1, 4, 2, 5)  # (N, 3, h, p, w, p)
        return x.reshape(n, 3, g * p, g * p)  # (N, 3, h·p, w·p)


class ReferenceSigmaVAE(PerImageScaleTokenizer):
    """The reference code's σ-VAE: ``encoder``, ``encoder_post_processor``, ``decoder``, ``decoder_post_processor``.

    ``ReferenceSigmaVAE(**file["config"])`` takes exactly the reference's state dict (plus the
    ``scale``/``bias`` normalization buffers every tokenizer has). Images must be
    ``img_size`` x ``img_size``. Built with PyTorch's default initialisation: this class loads
    the reference's trained weights (:func:`load_reference_sigma_vae`), it does not train.
    """

    kind = "reference_sigma_vae"

    def __init__(self, **config: Any) -> None:
        super().__init__()
        cfg = ReferenceSigmaVAEConfig.from_dict(config)
        self.config = cfg
        self.latent_channels = cfg.latent_size
        self.downsample = cfg.patch_size
        if cfg.encoder_arch == "vit-base":
            self.encoder: nn.Module = ReferenceViT(cfg.img_size, cfg.patch_size, in_chans=3)
        else:
            self.encoder = ReferenceBEiT3Vision(cfg.img_size)
        self.encoder_post_processor = EncodeHead(cfg.latent_size, cfg.grid)
        # The decoder reads the latent grid as a (latent_size, h, w) image with 1 x 1 patches.
        self.decoder = ReferenceViT(cfg.grid, 1, in_chans=cfg.latent_size)
        self.decoder_post_processor = DecodeHead(cfg.patch_size, cfg.grid)

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        """(C, H, W) of the latent; the learned positions allow ``img_size`` images only."""
        if image_size != self.config.img_size:
            raise ValueError(f"image_size={image_size}: this reference σ-VAE takes {self.config.img_size}x"
                             f"{self.config.img_size} images only (its learned positions fix the size); "
                             f"use image_size {self.config.img_size}")
        return super().latent_shape(image_size)

    def encode_moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(μ (N, C, S/p, S/p), s_std (N, 1, 1, 1))`` for images (N, 3, S, S) in [-1, 1], S = img_size.

        ``s_std`` is filled with ``std / 0.8``, the std of the per-image noise scale s (not a
        per-element posterior std); ``sample_posterior`` reads it that way.
        """
        side = self.config.img_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, side, side):
            raise ValueError(f"images of shape {tuple(images.shape)}: this reference σ-VAE takes (N, 3, {side}, "
                             f"{side}) images in [-1, 1]")
        mean = self.encoder_post_processor(self.encoder(images))  # (N, C, S/p, S/p)
        std = torch.full((mean.shape[0], 1, 1, 1), self.config.std / POSTERIOR_STD_DIVISOR,
                         device=mean.device, dtype=mean.dtype)  # (N, 1, 1, 1)
        return mean, std

    def decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, S, S), unclamped (the reference's ``decode``), from raw latents (N, C, S/p, S/p)."""
        shape = (self.latent_channels, self.config.grid, self.config.grid)
        if z.ndim != 4 or tuple(z.shape[1:]) != shape:
            raise ValueError(f"latents of shape {tuple(z.shape)}: this reference σ-VAE decodes (N, {shape[0]}, "
                             f"{shape[1]}, {shape[2]})")
        return self.decoder_post_processor(self.decoder(z))  # (N, 3, S, S)

    def config_dict(self) -> dict[str, Any]:
        """The reference's config dict, every key present: ``ReferenceSigmaVAE(**config_dict())`` rebuilds it."""
        values = dataclasses.asdict(self.config)
        return {k: values[k] for k in CONFIG_KEYS}


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _first(keys: list[str]) -> str:
    return f"{keys[0]!r}" + (f" (and {len(keys) - 1} more)" if len(keys) > 1 else "") if keys else "none"


def load_reference_sigma_vae(path: str | os.PathLike, blob: Mapping[str, Any] | None = None) -> ReferenceSigmaVAE:
    """Build the reference σ-VAE saved in ``path``, on CPU in eval mode, identity normalization.

    ``path`` is a torch file ``{"config": {...}, "model": state_dict}`` written by the reference
    code; it is read with ``torch.load(weights_only=True)`` (never an arbitrary unpickle) unless
    ``blob``, its already-read content, is given. The state dict must have exactly the keys and
    shapes the config implies; the weights keep the file's floating dtype (the widest, if mixed).

    Raises ``ValueError`` naming the file and the first missing or unexpected key, mismatched
    shape or bad config value.
    """
    if blob is None:
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise ValueError(f"{path} holds Python objects other than tensors, which are not unpickled") from err
    if not isinstance(blob, Mapping) or "config" not in blob or "model" not in blob:
        raise ValueError(f"{path}: expected a dict with 'config' and 'model' entries (a reference σ-VAE file)")
    state = blob["model"]
    try:
        config = ReferenceSigmaVAEConfig.from_dict(blob["config"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: {err}") from err
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: 'model' must be a state dict of tensors")

    # Build without memory or initialisation (meta tensors), then take the file's tensors as they are.
    with torch.device("meta"):
        model = ReferenceSigmaVAE(**dataclasses.asdict(config))
    expected = {k: v.shape for k, v in model.state_dict().items() if k not in ("scale", "bias")}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise ValueError(f"{path}: not the reference σ-VAE layout for {model.config_dict()}: missing key "
                         f"{_first(missing)}, unexpected key {_first(unexpected)}")
    for key, shape in expected.items():
        if state[key].shape != shape:
            raise ValueError(f"{path}: {key!r} has shape {tuple(state[key].shape)} but the config "
                             f"{model.config_dict()} needs {tuple(shape)}")
    floats = [v.dtype for v in state.values() if v.is_floating_point()]
    if len(floats) != len(state):
        raise ValueError(f"{path}: every weight must be a floating-point tensor")
    dtype = floats[0]
    for other in floats[1:]:
        dtype = torch.promote_types(dtype, other)
    weights = {k: state[k].to(dtype) for k in expected}
    weights["scale"] = torch.tensor(1.0, dtype=torch.float64)
    weights["bias"] = torch.tensor(0.0, dtype=torch.float64)
    model.load_state_dict(weights, assign=True)
    return model.eval()
