"""KL-16 and ``load_tokenizer``: LDM/MAR checkpoints map onto diffusers' AutoencoderKL exactly.

The reference is an LDM-layout KL-VAE written here from the LDM architecture (res-blocks with
``nin_shortcut``, 1x1-conv attention ``q``/``k``/``v``/``proj_out``, asymmetric-pad downsampling,
decoder levels stored in LDM's order), randomly initialised and saved the way MAR saves
``kl16.ckpt``: ``torch.save({"model": state_dict})``.
"""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from latentlm.config import ConfigError, TokenizerConfig
from latentlm.tokenizers import (
    KL16,
    KL16Config,
    build_tokenizer,
    load_tokenizer,
    tokenizer_from_record,
    tokenizer_record,
)
from latentlm.tokenizers.kl16 import config_from_ldm, ldm_to_diffusers
from latentlm.tokenizers.sigma_vae import SigmaVAE, checkpoint_config, save_sigma_vae

# ---------------------------------------------------------------------------------------------
# An LDM-layout KL-VAE (the module the checkpoints are saved from)
# ---------------------------------------------------------------------------------------------


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


class LdmResBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class LdmAttn(nn.Module):
    """Single-head self-attention over the H*W positions with 1x1-conv projections."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm = _norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        y = self.norm(x)
        q = self.q(y).reshape(n, c, h * w).transpose(1, 2)  # (N, HW, C)
        k = self.k(y).reshape(n, c, h * w)  # (N, C, HW)
        v = self.v(y).reshape(n, c, h * w)  # (N, C, HW)
        weights = torch.softmax(q @ k * c**-0.5, dim=-1)  # (N, HW query, HW key)
        out = (v @ weights.transpose(1, 2)).reshape(n, c, h, w)
        return x + self.proj_out(out)


class LdmDownsample(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # LDM pads right/bottom only


class LdmUpsample(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(c: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1, mid.attn_1, mid.block_2 = LdmResBlock(c, c), LdmAttn(c), LdmResBlock(c, c)
    return mid


class LdmKL(nn.Module):
    """LDM's AutoencoderKL (Encoder, Decoder, quant convs) for ``KL16Config``-style arguments."""

    def __init__(self, ch: int, ch_mult: tuple[int, ...], blocks: int, z: int, enc_attn=(), dec_attn=()) -> None:
        super().__init__()
        widths = [ch * m for m in ch_mult]
        levels = len(widths)
        self.encoder = nn.Module()
        self.encoder.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        self.encoder.down = nn.ModuleList()
        cin = ch
        for i, width in enumerate(widths):
            level = nn.Module()
            level.block = nn.ModuleList(LdmResBlock(cin if j == 0 else width, width) for j in range(blocks))
            level.attn = nn.ModuleList(LdmAttn(width) for _ in range(blocks if i in enc_attn else 0))
            if i < levels - 1:
                level.downsample = LdmDownsample(width)
            self.encoder.down.append(level)
            cin = width
        self.encoder.mid = _mid(cin)
        self.encoder.norm_out, self.encoder.conv_out = _norm(cin), nn.Conv2d(cin, 2 * z, 3, padding=1)
        self.decoder = nn.Module()
        self.decoder.conv_in = nn.Conv2d(z, cin, 3, padding=1)
        self.decoder.mid = _mid(cin)
        up = [None] * levels
        for i in reversed(range(levels)):  # built from the lowest resolution, stored by level (LDM's insert(0))
            level = nn.Module()
            level.block = nn.ModuleList(LdmResBlock(cin if j == 0 else widths[i], widths[i]) for j in range(blocks + 1))
            level.attn = nn.ModuleList(LdmAttn(widths[i]) for _ in range(blocks + 1 if i in dec_attn else 0))
            if i > 0:
                level.upsample = LdmUpsample(widths[i])
            up[i] = level
            cin = widths[i]
        self.decoder.up = nn.ModuleList(up)
        self.decoder.norm_out, self.decoder.conv_out = _norm(cin), nn.Conv2d(cin, 3, 3, padding=1)
        self.quant_conv, self.post_quant_conv = nn.Conv2d(2 * z, 2 * z, 1), nn.Conv2d(z, z, 1)

    @staticmethod
    def _level(level: nn.Module, x: torch.Tensor) -> torch.Tensor:
        for j, block in enumerate(level.block):
            x = block(x)
            if len(level.attn):
                x = level.attn[j](x)
        return x

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e = self.encoder
        h = e.conv_in(x)
        for level in e.down:
            h = self._level(level, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = e.mid.block_2(e.mid.attn_1(e.mid.block_1(h)))
        mean, logvar = self.quant_conv(e.conv_out(F.silu(e.norm_out(h)))).chunk(2, dim=1)
        return mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        d = self.decoder
        h = d.conv_in(self.post_quant_conv(z))
        h = d.mid.block_2(d.mid.attn_1(d.mid.block_1(h)))
        for level in reversed(d.up):
            h = self._level(level, h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return d.conv_out(F.silu(d.norm_out(h)))


def tiny_ldm(seed: int = 0, **kwargs) -> LdmKL:
    """Random LDM-layout KL-VAE: widths 32/64/64 (f = 4), 2 res-blocks, 16 latent channels, attention in the
    lowest encoder level (as MAR) and, to exercise the reversed decoder order, the lowest decoder level.
    Every parameter (norm gains included) is random so that a misplaced weight changes the output."""
    torch.manual_seed(seed)
    args = dict(ch=32, ch_mult=(1, 2, 2), blocks=2, z=16, enc_attn=(2,), dec_attn=(2,)) | kwargs
    model = LdmKL(**args).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.3 * torch.randn_like(p) / max(1, p[0].numel()) ** 0.5)
    return model


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------


def test_mar_style_checkpoint_loads_and_matches_the_ldm_module(tmp_path):
    ref = tiny_ldm()
    path = tmp_path / "kl16.ckpt"
    state = dict(ref.state_dict()) | {"loss.logvar": torch.zeros(())}  # LDM training ckpts carry loss weights
    torch.save({"model": state}, path)  # how MAR saves kl16.ckpt: weights under "model", no "config"
    tokenizer = load_tokenizer(path)
    assert isinstance(tokenizer, KL16) and tokenizer.kind == "kl16"
    assert tokenizer.config == KL16Config(ch=32, ch_mult=(1, 2, 2), encoder_attn_levels=(2,), decoder_attn_levels=(2,))
    assert tokenizer.latent_shape(16) == (16, 4, 4)
    assert tokenizer.normalization() == {"scale": 1.0, "bias": 0.0}  # fitted later on the training latents

    images = torch.rand(3, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        ref_mean, ref_std = ref.encode(images)
        mean, std = tokenizer.encode_moments(images)
        z = ref_mean + ref_std * torch.randn_like(ref_std)
        ref_images, images_out = ref.decode(z), tokenizer.decode_raw(z)
    assert mean.shape == (3, 16, 4, 4) and std.shape == (3, 16, 4, 4)
    # Same network; the attention differs only in summation order (SDPA vs two matmuls), so the outputs agree
    # to float32 rounding (relative to their magnitude), while one misplaced weight changes them by O(1).
    for ours, theirs in ((mean, ref_mean), (std, ref_std), (images_out, ref_images)):
        assert (ours - theirs).abs().max() <= 1e-5 * theirs.abs().max(), (ours - theirs).abs().max()
        assert theirs.std() > 0.01 * theirs.abs().max()  # not near-constant

    # The same state dict as .safetensors (preferred) gives the same tokenizer, bit for bit.
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "kl16.safetensors"))
    again = load_tokenizer(tmp_path / "kl16.safetensors")
    assert again.fingerprint() == tokenizer.fingerprint()
    with torch.no_grad():
        assert torch.equal(again.encode_moments(images)[0], mean)


def test_mapping_is_complete_and_reshapes_attention():
    ref = tiny_ldm()
    converted, unknown = ldm_to_diffusers(ref.state_dict(), levels=3)
    assert unknown == []
    target = KL16(config_from_ldm(ref.state_dict())).vae.state_dict()
    assert sorted(converted) == sorted(target)  # every diffusers weight gets exactly one LDM weight
    assert all(converted[k].shape == target[k].shape for k in target)
    assert torch.equal(converted["encoder.down_blocks.2.attentions.1.to_q.weight"],
                       ref.state_dict()["encoder.down.2.attn.1.q.weight"][:, :, 0, 0])
    # LDM stores decoder levels by resolution level; diffusers from the lowest resolution up.
    assert torch.equal(converted["decoder.up_blocks.0.attentions.2.to_out.0.bias"],
                       ref.state_dict()["decoder.up.2.attn.2.proj_out.bias"])
    assert torch.equal(converted["decoder.up_blocks.2.resnets.0.conv_shortcut.weight"],
                       ref.state_dict()["decoder.up.0.block.0.nin_shortcut.weight"])


def test_full_size_mar_layout_is_the_default_config():
    # MAR's KL-16 at full size, on the meta device (shapes only, nothing allocated).
    with torch.device("meta"):
        ref = LdmKL(ch=128, ch_mult=(1, 1, 2, 2, 4), blocks=2, z=16, enc_attn=(4,))
        state = ref.state_dict()
        cfg = config_from_ldm(state)
        assert cfg == KL16Config()
        target = KL16(cfg).vae.state_dict()
    converted, unknown = ldm_to_diffusers(state, levels=5)
    assert unknown == [] and sorted(converted) == sorted(target)
    assert all(converted[k].shape == target[k].shape for k in target)
    assert KL16Config().downsample == 16 and sum(v.numel() for v in target.values()) == sum(
        p.numel() for p in ref.parameters())


def test_sigma_vae_checkpoints_with_config_load(tmp_path):
    torch.manual_seed(0)
    sigma = SigmaVAE(latent_channels=4, base_channels=32, channel_mult=(1, 2)).eval()
    sigma.set_normalization(0.5, -0.25)
    file = save_sigma_vae(sigma, tmp_path / "sigma.safetensors")
    torch.save({"config": checkpoint_config(sigma), "model": sigma.state_dict()}, tmp_path / "sigma.pt")
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        expected = sigma.encode(images, sample=False)
    for path in (file, tmp_path, tmp_path / "sigma.pt"):  # safetensors file, its directory, torch file
        if path == tmp_path:
            save_sigma_vae(sigma, tmp_path)  # tmp_path/tokenizer.safetensors
        loaded = load_tokenizer(path)
        assert isinstance(loaded, SigmaVAE) and loaded.fingerprint() == sigma.fingerprint()
        assert loaded.normalization() == {"scale": 0.5, "bias": -0.25}
        with torch.no_grad():
            assert torch.equal(loaded.encode(images, sample=False), expected)


def test_unknown_layouts_say_what_was_found_and_expected(tmp_path):
    torch.save({"weights": {"conv.weight": torch.zeros(2)}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"other\.pt: unknown tokenizer layout: found a dict with 1 keys "
                                         r"\['weights'\].*expected a σ-VAE checkpoint.*LDM/MAR KL-VAE"):
        load_tokenizer(tmp_path / "other.pt")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match=r"found a dict with 1 keys \['x'\] and no 'config' metadata"):
        load_tokenizer(tmp_path / "other.safetensors")
    (tmp_path / "weights.npz").write_bytes(b"")
    with pytest.raises(ValueError, match=r"unknown tokenizer file type '\.npz'"):
        load_tokenizer(tmp_path / "weights.npz")
    torch.save({"model": tiny_ldm().state_dict(), "args": argparse.Namespace(lr=1.0)}, tmp_path / "pickled.ckpt")
    with pytest.raises(ValueError, match="holds Python objects other than tensors, which are not unpickled"):
        load_tokenizer(tmp_path / "pickled.ckpt")
    broken = dict(tiny_ldm().state_dict())
    del broken["encoder.mid.attn_1.k.weight"]
    torch.save({"model": broken}, tmp_path / "broken.ckpt")
    with pytest.raises(ValueError, match=r"broken\.ckpt: an LDM KL-VAE state dict that does not load.*missing "
                                         r"\['encoder\.mid_block\.attentions\.0\.to_k\.weight'\]"):
        load_tokenizer(tmp_path / "broken.ckpt")


def test_build_tokenizer_kl16_and_record_round_trip(tmp_path):
    torch.save({"model": tiny_ldm().state_dict()}, tmp_path / "kl16.ckpt")
    tokenizer = build_tokenizer(TokenizerConfig(kind="kl16", path=str(tmp_path / "kl16.ckpt")))
    assert not any(p.requires_grad for p in tokenizer.parameters())
    tokenizer.set_normalization(2.0, 0.5)
    record = tokenizer_record(tokenizer, str(tmp_path / "kl16.ckpt"))
    assert record["kind"] == "kl16" and record["config"]["ch_mult"] == [1, 2, 2]
    rebuilt = tokenizer_from_record(record)
    assert rebuilt.fingerprint() == tokenizer.fingerprint() and rebuilt.normalization() == {"scale": 2.0, "bias": 0.5}
    assert KL16(**record["config"]).config == tokenizer.config  # config_dict rebuilds the architecture

    save_sigma_vae(SigmaVAE(latent_channels=4, base_channels=32, channel_mult=(1, 2)), tmp_path / "s.safetensors")
    with pytest.raises(ConfigError, match=r"is a sigma_vae checkpoint, not KL-16; pass --tokenizer.kind sigma_vae"):
        build_tokenizer(TokenizerConfig(kind="kl16", path=str(tmp_path / "s.safetensors")))
    with pytest.raises(ConfigError, match="tokenizer.kind=kl16 needs --tokenizer.path"):
        build_tokenizer(dataclasses.replace(TokenizerConfig(kind="kl16"), path=None))
