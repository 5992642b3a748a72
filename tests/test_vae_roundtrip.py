"""``latentlm vae-roundtrip``: the PNG holds original | reconstruction; PSNR and SSIM against references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from latentlm.cli import main
from latentlm.data import ImageFolder
from latentlm.metrics.image import psnr, ssim
from latentlm.tokenizers import load_tokenizer
from latentlm.tokenizers.sigma_vae import SigmaVAE, save_sigma_vae
from train_helpers import make_image_folder


def naive_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Wang et al. (2004) SSIM written out window by window: (C, H, W) in [0, 1], 11x11 Gaussian (sigma 1.5)
    weights, every window inside the image, mean over windows and channels."""
    k = 11
    x = np.arange(k) - 5
    g = np.exp(-(x[:, None] ** 2 + x[None, :] ** 2) / (2 * 1.5**2))
    g /= g.sum()
    c1, c2 = 0.01**2, 0.03**2
    values = []
    for ch in range(a.shape[0]):
        for i in range(a.shape[1] - k + 1):
            for j in range(a.shape[2] - k + 1):
                p, q = a[ch, i:i + k, j:j + k], b[ch, i:i + k, j:j + k]
                mp, mq = (g * p).sum(), (g * q).sum()
                vp, vq = (g * (p - mp) ** 2).sum(), (g * (q - mq) ** 2).sum()
                cov = (g * (p - mp) * (q - mq)).sum()
                values.append((2 * mp * mq + c1) * (2 * cov + c2) / ((mp**2 + mq**2 + c1) * (vp + vq + c2)))
    return float(np.mean(values))


def tiny_sigma_vae() -> SigmaVAE:
    torch.manual_seed(0)
    return SigmaVAE(latent_channels=4, base_channels=32, channel_mult=(1, 2))


def test_psnr_and_ssim_pin_known_values():
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 14, 13, generator=gen, dtype=torch.float64)
    b = (a + 0.1 * torch.randn(a.shape, generator=gen, dtype=torch.float64)).clamp(0, 1)
    assert psnr(a, (a + 1 / 255).clamp(max=2)).tolist() == pytest.approx([20 * math.log10(255)] * 2)  # 48.13 dB
    assert psnr(a, a).tolist() == [math.inf, math.inf]
    assert ssim(a, a).tolist() == pytest.approx([1.0, 1.0], abs=1e-12)
    got = ssim(a, b).tolist()
    assert got == pytest.approx([naive_ssim(a[i].numpy(), b[i].numpy()) for i in range(2)], abs=1e-12)
    assert 0.3 < got[0] < 0.95


def test_vae_roundtrip_writes_side_by_side_png_and_prints_scores(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", size=16)
    file = save_sigma_vae(tiny_sigma_vae(), tmp_path / "t.safetensors")
    out = tmp_path / "figs" / "roundtrip.png"
    (tmp_path / "broken.png").write_bytes(b"not a png")
    chosen = [str(ImageFolder(data, 8).samples[i][0]) for i in (0, 9)] + [str(tmp_path / "broken.png")]
    with pytest.raises(SystemExit) as exit_info:
        main(["vae-roundtrip", "--tokenizer", str(file), "--images", *chosen, "--image-size", "8", "--out", str(out),
              "--device", "cpu"])
    assert exit_info.value.code == 0
    grid = np.asarray(Image.open(out))
    assert grid.shape == (16, 16, 3)  # 2 readable images, each a row of original | reconstruction

    folder = ImageFolder(data, 8)
    images = torch.stack([folder[i][0] for i in (0, 9)])  # (2, 3, 8, 8)
    with torch.no_grad():
        recon = load_tokenizer(file).decode_raw(load_tokenizer(file).encode_raw(images, sample=False)).clamp(-1, 1)
    as_uint8 = [((t + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy() for t in (images, recon)]
    for row in range(2):
        assert np.array_equal(grid[8 * row:8 * row + 8, :8], as_uint8[0][row])  # original
        assert np.array_equal(grid[8 * row:8 * row + 8, 8:], as_uint8[1][row])  # reconstruction

    printed = capsys.readouterr().out
    scores_p = psnr(*(torch.from_numpy(a).permute(0, 3, 1, 2) / 255 for a in as_uint8)).tolist()
    scores_s = ssim(*(torch.from_numpy(a).permute(0, 3, 1, 2) / 255 for a in as_uint8)).tolist()
    for path, p, s in zip(chosen, scores_p, scores_s, strict=False):
        assert f"{path}  {p:9.2f}  {s:.4f}" in printed
    assert f"mean of 2: PSNR {sum(scores_p) / 2:.2f} dB, SSIM {sum(scores_s) / 2:.4f} (sigma_vae, posterior mean)" \
        in printed


def test_vae_roundtrip_draws_random_images_from_a_folder(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", size=8)
    file = save_sigma_vae(tiny_sigma_vae(), tmp_path / "t.safetensors")
    args = ["vae-roundtrip", "--tokenizer", str(file), "--folder", str(data), "--num-images", "3", "--image-size", "8",
            "--device", "cpu", "--sample-posterior"]
    for name in ("a.png", "b.png"):
        with pytest.raises(SystemExit):
            main([*args, "--out", str(tmp_path / name)])
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()  # seeded choice and noise
    assert np.asarray(Image.open(tmp_path / "a.png")).shape == (24, 16, 3)
    assert "mean of 3:" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["vae-roundtrip", "--tokenizer", str(file), "--image-size", "8"])
    assert exit_info.value.code == 2  # neither images nor a folder
