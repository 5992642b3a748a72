"""KL-16: the convolutional KL-VAE of latent diffusion (LDM) as trained and released by MAR (``kl16.ckpt``).

Architecture (MAR's ``models/vae.py``, LDM's ``Encoder``/``Decoder``): width ``ch`` 128, ``ch_mult``
(1, 1, 2, 2, 4) so the image is downsampled 16x, 2 res-blocks per encoder level and 3 per decoder
level, a mid block (res-block, self-attention, res-block) in both, and self-attention after every
res-block of the lowest encoder level (LDM's ``attn_resolutions=(16,)`` at its nominal resolution
256); 16 latent channels. The posterior is a diagonal Gaussian: ``quant_conv`` gives (mean, logvar)
with logvar clamped to [-30, 20], std = exp(logvar / 2).

We run it on diffusers' ``AutoencoderKL``, whose layout is the same network under other names:
``DownEncoderBlock2D`` per level (``AttnDownEncoderBlock2D`` where LDM has attention),
``UpDecoderBlock2D`` per decoder level in reverse order, ``UNetMidBlock2D``. ``ldm_to_diffusers``
is the one place that maps the names (and reshapes LDM's 1x1-conv attention projections to
diffusers' linear ones); ``config_from_ldm`` reads the architecture off the weights' shapes, so
smaller KL-VAEs with the same layout load too.

The latent scale and bias are not constants here: like every tokenizer, KL-16 starts with the
identity normalization and the trainer (or the latent cache) fits it on the training latents.

Checkpoint: a torch file ``{"model": LDM state dict}`` without ``"config"`` (MAR), or the same
state dict in a ``.safetensors`` file. ``latentlm.tokenizers.load_tokenizer`` tells it apart from a
σ-VAE by its content.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

import torch

from latentlm.tokenizers.base import Tokenizer

# Key prefixes of LDM training checkpoints that are not part of the autoencoder (LPIPS, discriminator).
IGNORED_PREFIXES = ("loss.",)


@dataclass
class KL16Config:
    """Architecture of an LDM-layout KL-VAE; the defaults are MAR's KL-16."""

    in_channels: int = 3  # image channels (the tokenizer interface uses RGB)
    ch: int = 128  # width of the first level
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)  # width multiplier per level; downsampling 2^(levels - 1)
    num_res_blocks: int = 2  # res-blocks per encoder level; each decoder level has one more
    embed_dim: int = 16  # C: latent channels (LDM z_channels = embed_dim)
    encoder_attn_levels: tuple[int, ...] = (4,)  # levels with attention after each res-block (LDM attn_resolutions)
    decoder_attn_levels: tuple[int, ...] = ()  # MAR's decoder has none outside the mid block
    mid_attention: bool = True  # self-attention in the mid blocks
    norm_groups: int = 32  # GroupNorm groups (LDM's Normalize)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the bad field."""
        if not self.ch_mult or min(self.ch_mult) < 1:
            raise ValueError(f"ch_mult={self.ch_mult}: need at least one level, all >= 1")
        for name in ("in_channels", "ch", "num_res_blocks", "embed_dim", "norm_groups"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        levels = range(len(self.ch_mult))
        for name in ("encoder_attn_levels", "decoder_attn_levels"):
            if any(level not in levels for level in getattr(self, name)):
                raise ValueError(f"{name}={getattr(self, name)}: levels must be in 0..{len(self.ch_mult) - 1}")
        widths = [self.ch * m for m in self.ch_mult]
        if any(w % self.norm_groups for w in widths):
            raise ValueError(f"widths {widths} must be divisible by norm_groups={self.norm_groups}")


class KL16(Tokenizer):
    """KL-16 tokenizer: diagonal-Gaussian posterior over (C, S/f, S/f) latents, f = 2^(levels - 1).

    ``KL16(**tokenizer.config_dict())`` rebuilds the architecture; ``self.vae`` is a diffusers
    ``AutoencoderKL`` holding the weights (load LDM-named weights with ``load_ldm_state_dict``).
    """

    kind = "kl16"

    def __init__(self, config: KL16Config | None = None, **overrides: Any) -> None:
        super().__init__()
        from diffusers import AutoencoderKL  # imported here: diffusers takes seconds to import

        cfg = dataclasses.replace(config or KL16Config(), **overrides)
        for name in ("ch_mult", "encoder_attn_levels", "decoder_attn_levels"):
            setattr(cfg, name, tuple(getattr(cfg, name)))  # JSON gives lists
        cfg.validate()
        self.config = cfg
        self.latent_channels = cfg.embed_dim
        self.downsample = cfg.downsample
        levels = len(cfg.ch_mult)
        # diffusers lists decoder blocks from the lowest resolution up: block i is LDM level (levels - 1 - i).
        down = tuple("AttnDownEncoderBlock2D" if i in cfg.encoder_attn_levels else "DownEncoderBlock2D"
                     for i in range(levels))
        up = tuple("AttnUpDecoderBlock2D" if levels - 1 - i in cfg.decoder_attn_levels else "UpDecoderBlock2D"
                   for i in range(levels))
        self.vae = AutoencoderKL(
            in_channels=cfg.in_channels, out_channels=cfg.in_channels, down_block_types=down, up_block_types=up,
            block_out_channels=tuple(cfg.ch * m for m in cfg.ch_mult), layers_per_block=cfg.num_res_blocks,
            latent_channels=cfg.embed_dim, norm_num_groups=cfg.norm_groups, mid_block_add_attention=cfg.mid_attention,
        )

    def encode_moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, std)``, each (N, C, S/f, S/f), of the posterior for images (N, 3, S, S) in [-1, 1]."""
        side = images.shape[-1]
        if images.shape[-2] != side or side % self.downsample:
            raise ValueError(f"image of shape {tuple(images.shape)}: KL-16 needs square images whose side is a "
                             f"multiple of its downsampling factor {self.downsample}")
        posterior = self.vae.encode(images).latent_dist  # logvar clamped to [-30, 20], as in LDM
        return posterior.mean, posterior.std

    def decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, h·f, w·f), unclamped, from raw latents (N, C, h, w)."""
        return self.vae.decode(z).sample

    def config_dict(self) -> dict[str, Any]:
        cfg = dataclasses.asdict(self.config)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}

    def load_ldm_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load LDM/MAR-named weights; ``ValueError`` lists what is missing or left over."""
        converted, unknown = ldm_to_diffusers(state, len(self.config.ch_mult))
        if unknown:
            raise ValueError(f"{len(unknown)} weights have no place in the KL-16 layout: {_some(unknown)}")
        missing, unexpected = self.vae.load_state_dict(converted, strict=False)
        if missing or unexpected:
            raise ValueError(f"weights do not fit the KL-16 layout: missing {_some(missing)}, "
                             f"unexpected {_some(unexpected)}")


# ---------------------------------------------------------------------------------------------
# LDM names -> diffusers names (written once, tested against an LDM-layout module)
# ---------------------------------------------------------------------------------------------

_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _some(keys: list[str], limit: int = 6) -> str:
    keys = sorted(keys)
    return str(keys[:limit])[:-1] + (f", ... ({len(keys)} in all)]" if len(keys) > limit else "]")


def _ldm_key(key: str, levels: int) -> str | None:
    """The diffusers name of LDM weight ``key`` (None when it is not part of the layout)."""
    parts = key.split(".")
    if parts[0] in ("quant_conv", "post_quant_conv") and len(parts) == 2:
        return key
    if parts[0] not in ("encoder", "decoder") or len(parts) < 3:
        return None
    net, rest = parts[0], parts[1:]
    if rest[0] in ("conv_in", "conv_out") and len(rest) == 2:
        return key
    if rest[0] == "norm_out" and len(rest) == 2:
        return f"{net}.conv_norm_out.{rest[1]}"
    if rest[0] == "mid" and len(rest) == 4:  # mid.{block_1, attn_1, block_2}.<module>.<param>
        module = {"block_1": ("resnets.0", _RESNET), "block_2": ("resnets.1", _RESNET),
                  "attn_1": ("attentions.0", _ATTN)}.get(rest[1])
        if module is None or rest[2] not in module[1]:
            return None
        return f"{net}.mid_block.{module[0]}.{module[1][rest[2]]}.{rest[3]}"
    if (net, rest[0]) in (("encoder", "down"), ("decoder", "up")) and rest[1].isdigit():
        level = int(rest[1])
        # diffusers' decoder lists its up blocks from the lowest resolution: LDM up.{i} is up_blocks.{L-1-i}.
        block = f"{net}.down_blocks.{level}" if net == "encoder" else f"{net}.up_blocks.{levels - 1 - level}"
        tail = rest[2:]
        if len(tail) == 4 and tail[0] == "block" and tail[2] in _RESNET:
            return f"{block}.resnets.{tail[1]}.{_RESNET[tail[2]]}.{tail[3]}"
        if len(tail) == 4 and tail[0] == "attn" and tail[2] in _ATTN:
            return f"{block}.attentions.{tail[1]}.{_ATTN[tail[2]]}.{tail[3]}"
        if len(tail) == 3 and tail[:2] in (["downsample", "conv"], ["upsample", "conv"]):
            return f"{block}.{tail[0]}rs.0.conv.{tail[2]}"
    return None


def ldm_to_diffusers(state: dict[str, torch.Tensor], levels: int) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``(diffusers-named state dict, LDM keys with no place in the layout)`` for an LDM/MAR KL-VAE state
    dict with ``levels`` resolution levels. ``loss.*`` keys (training losses) are dropped silently.

    Attention projections are 1x1 convolutions in LDM, (C, C, 1, 1), and linear layers in diffusers, (C, C).
    """
    converted, unknown = {}, []
    for key, tensor in state.items():
        if key.startswith(IGNORED_PREFIXES):
            continue
        name = _ldm_key(key, levels)
        if name is None:
            unknown.append(key)
            continue
        if re.search(r"\.attentions\.\d+\.(to_q|to_k|to_v|to_out\.0)\.weight$", name) and tensor.ndim == 4:
            tensor = tensor[:, :, 0, 0]  # (C, C, 1, 1) -> (C, C)
        converted[name] = tensor
    return converted, unknown


def is_ldm_vae_state_dict(state: Any) -> bool:
    """Whether ``state`` looks like an LDM/MAR KL-VAE state dict (encoder, decoder and the quant convs)."""
    return isinstance(state, dict) and all(
        isinstance(state.get(k), torch.Tensor)
        for k in ("encoder.conv_in.weight", "decoder.conv_out.weight", "quant_conv.weight", "post_quant_conv.weight"))


def _indices(state: dict[str, torch.Tensor], prefix: str) -> list[int]:
    """Sorted distinct integers that follow ``prefix`` in the keys of ``state``."""
    found = {int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return sorted(found)


def config_from_ldm(state: dict[str, torch.Tensor]) -> KL16Config:
    """The architecture of an LDM-layout KL-VAE read off its weight names and shapes.

    Raises ``ValueError`` naming what does not fit (e.g. LDM's z_channels != embed_dim, which
    diffusers' ``AutoencoderKL`` cannot express).
    """
    if not is_ldm_vae_state_dict(state):
        raise ValueError("not an LDM KL-VAE state dict: need encoder.conv_in, decoder.conv_out, quant_conv and "
                         "post_quant_conv weights")
    conv_in = state["encoder.conv_in.weight"]  # (ch, in_channels, 3, 3)
    ch, in_channels = conv_in.shape[0], conv_in.shape[1]
    levels = _indices(state, "encoder.down.")
    if not levels or levels != list(range(len(levels))):
        raise ValueError(f"encoder levels {levels}: expected encoder.down.0 .. encoder.down.N")
    widths = [state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in levels]
    if any(w % ch for w in widths):
        raise ValueError(f"encoder widths {widths} are not multiples of ch={ch}")
    blocks = _indices(state, "encoder.down.0.block.")
    up_blocks = _indices(state, "decoder.up.0.block.")
    if len(up_blocks) != len(blocks) + 1:
        raise ValueError(f"{len(blocks)} res-blocks per encoder level but {len(up_blocks)} per decoder level; "
                         "the LDM layout has one more in the decoder")
    embed_dim = state["post_quant_conv.weight"].shape[0]
    z_channels = state["encoder.conv_out.weight"].shape[0] // 2
    if state["quant_conv.weight"].shape[:2] != (2 * embed_dim, 2 * z_channels) or z_channels != embed_dim:
        raise ValueError(f"quant_conv {tuple(state['quant_conv.weight'].shape)} with embed_dim {embed_dim} and "
                         f"z_channels {z_channels}: only variational KL-VAEs with z_channels == embed_dim load")
    mid = {net: f"{net}.mid.attn_1.q.weight" in state for net in ("encoder", "decoder")}
    if mid["encoder"] != mid["decoder"]:
        raise ValueError(f"mid-block attention in encoder {mid['encoder']} but decoder {mid['decoder']}")
    attn = {net: tuple(i for i in levels if f"{net}.{where}.{i}.attn.0.q.weight" in state)
            for net, where in (("encoder", "down"), ("decoder", "up"))}
    return KL16Config(in_channels=in_channels, ch=ch, ch_mult=tuple(w // ch for w in widths),
                      num_res_blocks=len(blocks), embed_dim=embed_dim, encoder_attn_levels=attn["encoder"],
                      decoder_attn_levels=attn["decoder"], mid_attention=mid["encoder"])


def kl16_from_ldm_state_dict(state: dict[str, torch.Tensor]) -> KL16:
    """A ``KL16`` (eval mode, identity normalization) with the architecture and weights of an LDM state dict."""
    tokenizer = KL16(config_from_ldm(state))
    tokenizer.load_ldm_state_dict(state)
    return tokenizer.eval()


__all__ = [
    "KL16",
    "KL16Config",
    "config_from_ldm",
    "is_ldm_vae_state_dict",
    "kl16_from_ldm_state_dict",
    "ldm_to_diffusers",
]
