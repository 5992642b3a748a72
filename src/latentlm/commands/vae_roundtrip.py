"""``latentlm vae-roundtrip``: how well a tokenizer reconstructs images.

Images get the training pipeline's ADM centre crop, are encoded (posterior mean, or a sample) and
decoded; the PNG shows each original beside its reconstruction, one row per image, and PSNR and
SSIM (``latentlm.metrics.image``) of the 8-bit images the PNG holds are printed per image and averaged.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from latentlm.config import ConfigError, VaeRoundtripConfig
from latentlm.data.images import IMAGE_EXTENSIONS, BadImageError, image_to_tensor, load_image
from latentlm.distributed import resolve_device
from latentlm.io import check_writable
from latentlm.metrics.image import psnr, ssim
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


def _choose(cfg: VaeRoundtripConfig) -> list[Path]:
    if cfg.images:
        return [Path(p) for p in cfg.images]
    folder = Path(cfg.folder)
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ConfigError(f"{folder}: no images with extensions {IMAGE_EXTENSIONS}")
    return random.Random(cfg.seed).sample(files, min(cfg.num_images, len(files)))


@torch.no_grad()
def roundtrip(cfg: VaeRoundtripConfig) -> RoundtripResult:
    """Encode and decode the images ``cfg`` names with the tokenizer file ``cfg.tokenizer``; write the
    side-by-side PNG to ``cfg.out`` and print one line per image and the means."""
    # Setup -----------------------------------------------------------------------------------
    cfg.validate()
    check_writable(Path(cfg.out).parent, "--out")
    try:
        tokenizer = load_tokenizer(cfg.tokenizer)
        tokenizer.latent_shape(cfg.image_size)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"tokenizer: {err}") from err
    device = resolve_device(cfg.device)
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


def run(cfg: VaeRoundtripConfig) -> int:
    roundtrip(cfg)
    return 0
