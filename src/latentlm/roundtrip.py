"""``latentlm vae-roundtrip``: how well a tokenizer reconstructs images.

Images get the training pipeline's ADM centre crop, are encoded (posterior mean, or a sample) and
decoded; the PNG shows each original beside its reconstruction, one row per image, and PSNR and
SSIM are printed per image and averaged. Both metrics compare the 8-bit images that the PNG
holds (values / 255 in [0, 1]):

* PSNR = 10 log10(1 / MSE) over all pixels and channels (infinite for an exact reconstruction);
* SSIM (Wang et al. 2004): 11x11 Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03, data range 1,
  over the window positions that fit inside the image ("valid"), averaged over positions and RGB
  channels. Images smaller than 11 pixels use a window of their size.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from latentlm.config import ConfigError, RoundtripConfig
from latentlm.data.images import IMAGE_EXTENSIONS, BadImageError, image_to_tensor, load_image
from latentlm.tokenizers import load_tokenizer

log = logging.getLogger(__name__)


@dataclass
class RoundtripResult:
    """What ``roundtrip`` returns: per-image scores in the order of ``paths``, and the PNG written."""

    paths: list[str]
    psnr: list[float]  # dB; inf for an exact reconstruction
    ssim: list[float]
    out: Path

    @property
    def mean_psnr(self) -> float:
        return sum(self.psnr) / len(self.psnr)

    @property
    def mean_ssim(self) -> float:
        return sum(self.ssim) / len(self.ssim)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of images (N, 3, H, W) with values in [0, 1], per image (N,)."""
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)  # (N,)
    return 10 * torch.log10(1.0 / mse)  # inf where mse == 0


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """SSIM of images (N, C, H, W) with values in [0, 1], per image (N,); see the module docstring."""
    a, b = a.double(), b.double()
    size = min(window, a.shape[-1], a.shape[-2])
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-coords**2 / (2 * sigma**2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(a.shape[1], 1, size, size)  # (C, 1, k, k), one per channel

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, kernel, groups=x.shape[1])  # (N, C, H-k+1, W-k+1): "valid" positions only

    c1, c2 = 0.01**2, 0.03**2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    ratio = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return ratio.flatten(1).mean(1)  # (N,)


def _choose(cfg: RoundtripConfig) -> list[Path]:
    if cfg.images:
        return [Path(p) for p in cfg.images]
    if cfg.folder is None:
        raise ConfigError("give image files (--images a.jpg b.png) or a folder to draw from (--folder DIR)")
    folder = Path(cfg.folder)
    if not folder.is_dir():
        raise ConfigError(f"folder={cfg.folder}: no such directory")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ConfigError(f"{folder}: no images with extensions {IMAGE_EXTENSIONS}")
    return random.Random(cfg.seed).sample(files, min(cfg.num_images, len(files)))


@torch.no_grad()
def roundtrip(cfg: RoundtripConfig) -> RoundtripResult:
    """Encode and decode the images ``cfg`` names with the tokenizer file ``cfg.tokenizer``; write the
    side-by-side PNG to ``cfg.out`` and print one line per image and the means."""
    # Setup -----------------------------------------------------------------------------------
    if cfg.num_images < 1 or cfg.image_size < 1:
        raise ConfigError(f"num_images={cfg.num_images} and image_size={cfg.image_size} must be >= 1")
    try:
        tokenizer = load_tokenizer(cfg.tokenizer)
        tokenizer.latent_shape(cfg.image_size)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"tokenizer: {err}") from err
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else (
        torch.device(cfg.device))
    tokenizer.to(device)

    # Images: unreadable ones are reported and left out ------------------------------------------
    paths, images = [], []
    for path in _choose(cfg):
        try:
            images.append(image_to_tensor(load_image(path, cfg.image_size, cfg.max_image_pixels)))
            paths.append(str(path))
        except BadImageError as err:
            log.warning("skipped unreadable image %s: %s", path, err)
    if not images:
        raise ConfigError("none of the chosen images could be read")
    x = torch.stack(images).to(device)  # (N, 3, S, S) in [-1, 1]

    # Round trip (normalization cancels, so raw latents are decoded directly) ----------------------
    generator = torch.Generator(device).manual_seed(cfg.seed)
    z = tokenizer.encode_raw(x, sample=cfg.sample_posterior, generator=generator)  # (N, C, S/f, S/f)
    recon = tokenizer.decode_raw(z).clamp(-1, 1)  # (N, 3, S, S)
    as_uint8 = [((t.cpu().double() + 1) * 127.5).round().clamp(0, 255) for t in (x, recon)]  # what the PNG holds
    original, rebuilt = (t / 255 for t in as_uint8)
    scores_psnr, scores_ssim = psnr(original, rebuilt).tolist(), ssim(original, rebuilt).tolist()

    # Outputs ---------------------------------------------------------------------------------
    rows = torch.cat(as_uint8, dim=3)  # (N, 3, S, 2S): original | reconstruction
    grid = torch.cat(list(rows), dim=1).permute(1, 2, 0).to(torch.uint8).numpy()  # (N S, 2S, 3)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(grid)).save(out)
    width = max(len(p) for p in paths)
    print(f"{'image':<{width}}  PSNR (dB)  SSIM")
    for path, p, s in zip(paths, scores_psnr, scores_ssim, strict=True):
        print(f"{path:<{width}}  {p:9.2f}  {s:.4f}")
    result = RoundtripResult(paths, scores_psnr, scores_ssim, out)
    mean_psnr = "inf" if math.isinf(result.mean_psnr) else f"{result.mean_psnr:.2f}"
    print(f"mean of {len(paths)}: PSNR {mean_psnr} dB, SSIM {result.mean_ssim:.4f} ({tokenizer.kind}, "
          f"{'posterior sample' if cfg.sample_posterior else 'posterior mean'}); wrote {out}")
    return result


__all__ = ["RoundtripResult", "psnr", "roundtrip", "ssim"]
