"""σ-VAE tokenizer: noise law, normalization round trip, checkpoints, both variants, and its trainer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.stats
import torch
from safetensors import safe_open

from latentlm.checkpoint import list_checkpoints, load_checkpoint
from latentlm.config import ConfigError, DataConfig, SigmaVAEConfig, TokenizerConfig, TokenizerTrainConfig
from latentlm.data.digits import DigitsDataset
from latentlm.tokenizers import build_tokenizer
from latentlm.tokenizers.sigma_vae import SigmaVAE, checkpoint_config, load_sigma_vae, save_sigma_vae
from latentlm.training.tokenizer import train_tokenizer

TINY_CONV = dict(latent_channels=4, base_channels=8, channel_mult=(1, 2))  # 16x16 -> 8x8 latents
TINY_VIT = dict(variant="vit", latent_channels=4, patch_size=4, hidden_size=32, depth=1, num_heads=2)


def images(n: int = 6, side: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def tiny(**overrides) -> SigmaVAE:
    torch.manual_seed(0)
    return SigmaVAE(**{**TINY_CONV, **overrides}).eval()


# ---------------------------------------------------------------------------------------------
# Posterior noise
# ---------------------------------------------------------------------------------------------


def test_per_image_noise_scale_has_the_configured_std():
    """z - μ = s·ε with one s ~ N(0, C_σ²) per image: per-image RMS of z - μ is |s| (half-normal, scale C_σ)."""
    c_sigma = 0.6  # not the default, so the test sees the configured value
    tok = tiny(noise_std=c_sigma)
    mean = torch.zeros(4000, 8, 16, 16)  # 2048 values per image: RMS(ε) = 1 within ~1.6%
    _, std = tok.encode_moments(images(2))
    std = std[:1].expand(4000, 1, 1, 1)
    z = tok.sample_posterior(mean, std, generator=torch.Generator().manual_seed(0))
    rms = z.pow(2).mean(dim=(1, 2, 3)).sqrt().double().numpy()  # (4000,) ≈ |s|
    assert np.sqrt(np.mean(rms**2)) == pytest.approx(c_sigma, rel=0.03)  # E[s²] = C_σ²
    ks = scipy.stats.kstest(rms / c_sigma, scipy.stats.halfnorm.cdf)
    assert ks.pvalue > 0.01, ks
    # Per-element noise of the same std would give every image RMS ≈ C_σ; here a fifth are below C_σ / 4.
    assert np.mean(rms < c_sigma / 4) == pytest.approx(scipy.stats.halfnorm.cdf(0.25), abs=0.03)
    # Within an image the noise is isotropic: ε has unit variance across channels and positions.
    per_image = (z / torch.from_numpy(rms).float()[:, None, None, None])
    assert per_image.std().item() == pytest.approx(1.0, abs=0.01)


def test_moments_and_modes():
    tok = tiny()
    x = images()
    mean, std = tok.encode_moments(x)
    assert mean.shape == (6, 4, 8, 8) and std.shape == (6, 1, 1, 1)
    assert torch.all(std == 0.75)  # the default C_σ, per image
    torch.testing.assert_close(tok.encode_raw(x, sample=False), mean)
    assert torch.equal(tok.sample_posterior(mean, None), mean)
    a = tok.encode_raw(x, generator=torch.Generator().manual_seed(1))
    b = tok.encode_raw(x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, mean)
    assert torch.equal(tiny(noise_std=0.0).encode_raw(x), tiny(noise_std=0.0).encode_raw(x, sample=False))


def test_encode_normalize_denormalize_decode_round_trip():
    tok = tiny()
    x = images()
    tok.set_normalization(2.5, -0.3)
    raw = tok.encode_raw(x, sample=False)
    latents = tok.encode(x, sample=False)
    torch.testing.assert_close(latents, (raw - 0.3) * 2.5)
    torch.testing.assert_close(tok.denormalize(latents), raw, rtol=0, atol=1e-6)
    torch.testing.assert_close(tok.decode(latents), tok.decode_raw(raw).clamp(-1, 1), rtol=0, atol=1e-5)
    assert tok.decode(latents).shape == x.shape


# ---------------------------------------------------------------------------------------------
# Variants and validation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, side, latent", [(TINY_CONV, 16, (4, 8, 8)), (TINY_VIT, 16, (4, 4, 4)),
                                              ({**TINY_VIT, "patch_size": 16}, 64, (4, 4, 4))])
def test_variants_shapes_and_gradients(kw, side, latent):
    tok = SigmaVAE(**kw)
    x = images(2, side)
    assert tok.latent_shape(side) == latent
    assert tok.encode(x).shape == (2, *latent)
    assert tok.decode(tok.encode(x)).shape == x.shape
    loss, parts = tok.loss(x)
    loss.backward()
    assert set(parts) == {"recon", "prior"}
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in tok.parameters())


def test_bad_inputs_raise_with_a_fix():
    with pytest.raises(ValueError, match="multiple of its downsampling factor 2"):
        tiny().encode(images(1, 15))
    with pytest.raises(ValueError, match="variant"):
        SigmaVAE(variant="mlp")
    with pytest.raises(ValueError, match="noise_std"):
        SigmaVAE(noise_std=-1.0)
    with pytest.raises(ValueError, match="hidden_size=30"):
        SigmaVAE(**{**TINY_VIT, "hidden_size": 30})
    with pytest.raises(ValueError, match="not divisible by the tokenizer's downsampling factor"):
        tiny().latent_shape(15)


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [TINY_CONV, TINY_VIT])
def test_checkpoint_reloads_to_identical_outputs(tmp_path, kw):
    tok = SigmaVAE(**kw).eval()
    tok.set_normalization(1.7, 0.05)
    x = images()
    path = save_sigma_vae(tok, tmp_path / "vae.safetensors")
    with safe_open(str(path), framework="pt") as f:
        config = json.loads(f.metadata()["config"])  # self-describing: the JSON config is in the file
    assert config["kind"] == "sigma_vae" and config["noise_std"] == 0.75
    assert config["normalization"] == {"scale": 1.7, "bias": 0.05}
    for source in (path, tmp_path):  # the file, or a directory holding tokenizer.safetensors
        if source == tmp_path:
            save_sigma_vae(tok, tmp_path)
        loaded = load_sigma_vae(source)
        assert loaded.config == tok.config and loaded.normalization() == tok.normalization()
        assert loaded.fingerprint() == tok.fingerprint()
        assert torch.equal(loaded.encode(x, sample=False), tok.encode(x, sample=False))
        z = tok.encode(x, generator=torch.Generator().manual_seed(3))
        assert torch.equal(loaded.encode(x, generator=torch.Generator().manual_seed(3)), z)
        assert torch.equal(loaded.decode(z), tok.decode(z))


def test_torch_checkpoint_layout_is_read_without_pickles(tmp_path):
    tok = tiny()
    tok.set_normalization(0.5, 0.1)
    state = {k: v for k, v in tok.state_dict().items() if k not in ("scale", "bias")}  # stats in config only
    torch.save({"config": checkpoint_config(tok), "model": state}, tmp_path / "vae.pt")
    loaded = load_sigma_vae(tmp_path / "vae.pt")
    assert loaded.normalization() == {"scale": 0.5, "bias": 0.1}
    assert torch.equal(loaded.encode(images(), sample=False), tok.encode(images(), sample=False))
    torch.save({"config": {**checkpoint_config(tok), "depths": 3}, "model": state}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="unknown σ-VAE config fields \\['depths'\\]"):
        load_sigma_vae(tmp_path / "bad.pt")
    with pytest.raises(FileNotFoundError, match="train-tokenizer"):
        load_sigma_vae(tmp_path / "missing.safetensors")


def test_build_tokenizer_loads_a_sigma_vae(tmp_path):
    tok = tiny()
    path = save_sigma_vae(tok, tmp_path)
    built = build_tokenizer(TokenizerConfig(kind="sigma_vae", path=str(path)))
    assert built.kind == "sigma_vae" and built.fingerprint() == tok.fingerprint()
    assert not any(p.requires_grad for p in built.parameters())


# ---------------------------------------------------------------------------------------------
# Training (`latentlm train-tokenizer`)
# ---------------------------------------------------------------------------------------------


def tokenizer_run(out, **overrides) -> TokenizerTrainConfig:
    values = dict(output_dir=str(out), vae=SigmaVAEConfig(**TINY_CONV), max_steps=30, batch_size=16, lr=3e-3,
                  warmup_steps=5, checkpoint_every=10, log_every=10, norm_images=200, progress=False)
    values.update(overrides)
    return TokenizerTrainConfig(**values)


def test_train_tokenizer_learns_and_exports(tmp_path):
    result = train_tokenizer(tokenizer_run(tmp_path / "run", max_steps=150))
    run = tmp_path / "run"
    assert result.step == 150 and not result.interrupted
    assert result.tokenizer_path == run / "tokenizer.safetensors"
    assert (run / "recon.png").is_file() and (run / "loss.png").is_file()
    assert [e.step for e in list_checkpoints(run) if e.problem is None] == [140, 150]  # keep_last=2
    assert np.mean(result.losses[-10:]) < 0.5 * np.mean(result.losses[:10])
    # The exported file is the EMA weights with normalization fitted on posterior samples.
    loaded = load_sigma_vae(result.tokenizer_path)
    assert loaded.fingerprint() == result.tokenizer.fingerprint()
    test = DigitsDataset("test").images[:64]
    raw = loaded.encode_raw(DigitsDataset("train").images[:200], generator=torch.Generator().manual_seed(0))
    assert loaded.normalize(raw).std().item() == pytest.approx(1.0, abs=0.1)
    recon = loaded.decode(loaded.encode(test, sample=False))
    assert torch.mean((recon - test) ** 2).item() < 0.1  # untrained: ~0.5 (mean square of the images)


def test_train_tokenizer_resumes_exactly(tmp_path):
    full = train_tokenizer(tokenizer_run(tmp_path / "full"))
    first = train_tokenizer(tokenizer_run(tmp_path / "split", stop_at_step=20))
    assert first.step == 20 and first.tokenizer_path is None
    second = train_tokenizer(tokenizer_run(tmp_path / "split", resume="auto"))
    assert second.step == 30 and second.losses == full.losses
    a, b = load_checkpoint(full.checkpoint), load_checkpoint(second.checkpoint)
    for key in a.model:
        assert torch.equal(a.model[key], b.model[key]) and torch.equal(a.ema[key], b.ema[key]), key
    assert a.tokenizer == b.tokenizer and a.optimizer['state'].keys() == b.optimizer['state'].keys()


def test_train_tokenizer_rejects_bad_options(tmp_path):
    with pytest.raises(ConfigError, match="not divisible by the σ-VAE's downsampling factor 2"):
        train_tokenizer(tokenizer_run(tmp_path, data=DataConfig(kind="digits", image_size=15)))
    with pytest.raises(ConfigError, match="vae: variant"):
        train_tokenizer(tokenizer_run(tmp_path, vae=SigmaVAEConfig(variant="mlp")))
    with pytest.raises(ConfigError, match="max_steps=0"):
        train_tokenizer(tokenizer_run(tmp_path, max_steps=0))
