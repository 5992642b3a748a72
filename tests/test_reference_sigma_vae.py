"""σ-VAE files of the reference LatentLM code: golden numerics, key layout, noise law, errors.

The goldens (``shared/fixtures/official_sigma_vae/``) are what the reference code computed, in
float64, from weights given by a formula; the tests rebuild those weights, save them in the
reference's file format and load them through ``load_tokenizer`` as a user would.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch
from safetensors.torch import load_file

from latentlm.config import ConfigError, TokenizerConfig
from latentlm.tokenizers import build_tokenizer, load_tokenizer, tokenizer_from_record, tokenizer_record
from latentlm.tokenizers.reference_sigma_vae import ReferenceSigmaVAE, is_reference_sigma_vae_config
from latentlm.tokenizers.sigma_vae import SigmaVAE, save_sigma_vae

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "official_sigma_vae"
ARCHS = ("vit_base", "beit3_base")
SMALL = {"img_size": 64, "patch_size": 16, "latent_size": 16, "std": 0.75, "encoder_arch": "vit-base",
         "decoder_arch": "vit-base"}
NORMALIZATION_BUFFERS = ("scale", "bias")  # every tokenizer's, not the reference's


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).abs().max() / want.abs().max()).item()


def manifest_state(manifest: dict) -> dict[str, torch.Tensor]:
    """The fixture README's weight formula, tensor k of the manifest seeded with 1000 + k."""
    state = {}
    for k, entry in enumerate(manifest["tensors"]):
        shape = entry["shape"]
        z = torch.randn(shape, generator=torch.Generator().manual_seed(1000 + k), dtype=torch.float64)
        if len(shape) >= 2:
            z = z * (0.02 if shape[0] == 1 else 1 / math.sqrt(math.prod(shape[1:])))
        elif entry["key"].endswith("weight"):
            z = 1 + 0.1 * z
        else:
            z = 0.1 * z
        state[entry["key"]] = z
    return state


def stub_state(config: dict) -> dict[str, torch.Tensor]:
    """Zero weights of the right keys and shapes, stored as one broadcast value each (tiny files)."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in ReferenceSigmaVAE(**config).state_dict().items()}
    return {k: torch.zeros(()).expand(s) for k, s in shapes.items() if k not in NORMALIZATION_BUFFERS}


def save_reference(path: Path, config: dict, state: dict[str, torch.Tensor]) -> Path:
    torch.save({"config": config, "model": state}, path)
    return path


# ---------------------------------------------------------------------------------------------
# Goldens of the reference code
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=ARCHS)
def golden(request, tmp_path_factory):
    """(arch, manifest, golden tensors, tokenizer loaded from a reference-format file) for one encoder."""
    if not FIXTURES.is_dir():
        pytest.skip(f"the reference σ-VAE goldens are not at {FIXTURES} (shared/fixtures beside the repository)")
    arch = request.param
    manifest = json.loads((FIXTURES / f"{arch}.manifest.json").read_text())
    tensors = load_file(str(FIXTURES / f"{arch}.golden.safetensors"))
    path = save_reference(tmp_path_factory.mktemp(arch) / "sigma_vae.pt", manifest["config"], manifest_state(manifest))
    tokenizer = load_tokenizer(path)
    path.unlink()  # 1.4 GB of float64 weights; the tokenizer holds its own copy
    return arch, manifest, tensors, tokenizer


def test_loads_with_the_reference_layout(golden):
    _, manifest, _, tok = golden
    assert isinstance(tok, ReferenceSigmaVAE) and tok.kind == "reference_sigma_vae"
    assert tok.config_dict() == manifest["config"]
    keys = list(tok.state_dict())
    assert keys[:2] == list(NORMALIZATION_BUFFERS)
    assert keys[2:] == [entry["key"] for entry in manifest["tensors"]]  # the reference's keys, in its order
    assert all(p.dtype == torch.float64 and not p.requires_grad for p in tok.parameters())  # the file's dtype
    assert tok.normalization() == {"scale": 1.0, "bias": 0.0}
    assert (tok.latent_channels, tok.downsample, tok.latent_shape(64)) == (16, 16, (16, 4, 4))


def test_matches_the_goldens_in_float64(golden):
    _, _, want, tok = golden
    with torch.no_grad():
        mean, std = tok.encode_moments(want["images"])
        decoded = tok.decode_raw(want["posterior_mean"])
    assert mean.dtype == decoded.dtype == torch.float64
    assert relative_error(mean, want["posterior_mean"]) <= 1e-8
    assert relative_error(decoded, want["decoded"]) <= 1e-8
    assert std.shape == (2, 1, 1, 1) and torch.all(std == 0.75 / 0.8)


def test_matches_the_goldens_in_float32(golden):
    _, _, want, tok = golden
    tok32 = copy.deepcopy(tok).float()
    with torch.no_grad():
        mean, _ = tok32.encode_moments(want["images"].float())
        decoded = tok32.decode_raw(want["posterior_mean"].float())
    assert mean.dtype == decoded.dtype == torch.float32
    assert relative_error(mean, want["posterior_mean"]) <= 1e-4
    assert relative_error(decoded, want["decoded"]) <= 1e-4


# ---------------------------------------------------------------------------------------------
# Posterior noise: s ~ N(0, (std / 0.8)^2) per image
# ---------------------------------------------------------------------------------------------


def test_posterior_scale_is_std_over_point_eight(tmp_path):
    """z - μ = s·ε with s ~ N(0, (std/0.8)²) per image: per-image RMS of z - μ is half-normal of scale std/0.8."""
    config = {**SMALL, "std": 0.6}  # scale 0.75: the value our σ-VAE would use for std 0.6 is excluded below
    tok = load_tokenizer(save_reference(tmp_path / "vae.pt", config, stub_state(config)))
    with torch.no_grad():
        _, std = tok.encode_moments(torch.zeros(2, 3, 64, 64))
    scale = 0.6 / 0.8
    assert std.shape == (2, 1, 1, 1) and torch.allclose(std, torch.tensor(scale))
    mean = torch.zeros(4000, 16, 16, 8)  # 2048 values per image: RMS(ε) = 1 within ~1.6%
    z = tok.sample_posterior(mean, std[:1].expand(4000, 1, 1, 1), generator=torch.Generator().manual_seed(0))
    rms = z.pow(2).mean(dim=(1, 2, 3)).sqrt().double().numpy()  # (4000,) ≈ |s|
    assert np.sqrt(np.mean(rms**2)) == pytest.approx(scale, rel=0.03)  # E[s²] = (std / 0.8)², not std²
    ks = scipy.stats.kstest(rms / scale, scipy.stats.halfnorm.cdf)
    assert ks.pvalue > 0.01, ks
    draw = [tok.sample_posterior(mean[:8], std[:1].expand(8, 1, 1, 1), generator=torch.Generator().manual_seed(1))
            for _ in range(2)]
    assert torch.equal(*draw)  # s and ε both come from the generator
    assert torch.equal(tok.sample_posterior(mean[:3], None), mean[:3])


# ---------------------------------------------------------------------------------------------
# Loading: detection, records, errors
# ---------------------------------------------------------------------------------------------


def test_config_detection_tells_the_formats_apart():
    assert is_reference_sigma_vae_config(SMALL)
    assert is_reference_sigma_vae_config({"latent_size": 16, "std": 0.75, "patch_size": 16})  # defaults for the rest
    assert not is_reference_sigma_vae_config({"kind": "sigma_vae", "latent_channels": 16, "noise_std": 0.75})
    assert not is_reference_sigma_vae_config({"latent_size": 16})
    assert not is_reference_sigma_vae_config([("latent_size", 16), ("std", 0.75)])


def test_build_tokenizer_and_records(tmp_path):
    path = save_reference(tmp_path / "vae.pt", SMALL, stub_state(SMALL))
    tok = build_tokenizer(TokenizerConfig(kind="reference_sigma_vae", path=str(path)))
    assert tok.kind == "reference_sigma_vae" and not any(p.requires_grad for p in tok.parameters())
    tok.set_normalization(0.5, 0.1)
    rebuilt = tokenizer_from_record(json.loads(json.dumps(tokenizer_record(tok, str(path)))))
    assert rebuilt.fingerprint() == tok.fingerprint() and rebuilt.normalization() == {"scale": 0.5, "bias": 0.1}
    assert rebuilt.config_dict() == SMALL
    with pytest.raises(ConfigError, match="needs --tokenizer.path"):
        build_tokenizer(TokenizerConfig(kind="reference_sigma_vae"))
    ours = save_sigma_vae(SigmaVAE(latent_channels=4, base_channels=8, channel_mult=(1, 2)), tmp_path / "ours")
    with pytest.raises(ConfigError, match="is a sigma_vae checkpoint.*--tokenizer.kind sigma_vae"):
        build_tokenizer(TokenizerConfig(kind="reference_sigma_vae", path=str(ours)))


def test_wrong_keys_and_shapes_name_the_key_and_file(tmp_path):
    state = stub_state(SMALL)
    renamed = {("encoder.norm.weight" if k == "encoder.fc_norm.weight" else k): v for k, v in state.items()}
    path = save_reference(tmp_path / "renamed.pt", SMALL, renamed)
    with pytest.raises(ValueError, match=r"renamed\.pt: .*missing key 'encoder\.fc_norm\.weight', "
                                         r"unexpected key 'encoder\.norm\.weight'"):
        load_tokenizer(path)
    path = save_reference(tmp_path / "shape.pt", SMALL, {**state, "encoder.pos_embed": torch.zeros(1, 18, 768)})
    with pytest.raises(ValueError, match=r"shape\.pt: 'encoder\.pos_embed' has shape \(1, 18, 768\) .*"
                                         r"needs \(1, 17, 768\)"):
        load_tokenizer(path)
    beit3 = {**SMALL, "encoder_arch": "beit3-base"}
    path = save_reference(tmp_path / "arch.pt", beit3, state)  # ViT weights under a BEiT-3 config
    with pytest.raises(ValueError, match=r"arch\.pt: .*missing key 'encoder\.vision_embed\.mask_token' "
                                         r"\(and \d+ more\), unexpected key 'encoder\.cls_token'"):
        load_tokenizer(path)


@pytest.mark.parametrize(("config", "message"), [
    ({**SMALL, "depth": 6}, r"unknown \['depth'\]"),
    ({**SMALL, "encoder_arch": "vit-large"}, "encoder_arch='vit-large': must be one of vit-base, beit3-base"),
    ({**SMALL, "decoder_arch": "beit3-base"}, "decoder_arch='beit3-base': must be one of vit-base"),
    ({**SMALL, "encoder_arch": "beit3-base", "patch_size": 8}, "always uses 16-pixel patches"),
    ({**SMALL, "img_size": 72}, "img_size=72 is not a multiple of patch_size=16"),
])
def test_bad_reference_configs_are_named(tmp_path, config, message):
    path = save_reference(tmp_path / "vae.pt", config, {"w": torch.zeros(1)})
    with pytest.raises(ValueError, match=rf"vae\.pt: .*{message}"):
        load_tokenizer(path)


def test_unknown_config_says_what_was_found(tmp_path):
    path = save_reference(tmp_path / "other.pt", {"foo": 1, "bar": 2}, {f"w{i}": torch.zeros(1) for i in range(3)})
    with pytest.raises(ValueError, match=r"other\.pt: a dict with config keys \['bar', 'foo'\] and 3 weight "
                                         r"tensors: not a σ-VAE of latentlm or of the reference code \(expected"):
        load_tokenizer(path)


def test_images_and_latents_of_the_wrong_size_are_refused(tmp_path):
    tok = load_tokenizer(save_reference(tmp_path / "vae.pt", SMALL, stub_state(SMALL)))
    with pytest.raises(ValueError, match=r"takes 64x64 images only .*use image_size 64"):
        tok.latent_shape(128)
    with pytest.raises(ValueError, match=r"takes \(N, 3, 64, 64\) images"):
        tok.encode_moments(torch.zeros(1, 3, 128, 128))
    with pytest.raises(ValueError, match=r"decodes \(N, 16, 4, 4\)"):
        tok.decode_raw(torch.zeros(1, 16, 8, 8))
