"""Reconstruction metrics of 8-bit images (values / 255 in [0, 1]), per image:

* PSNR = 10 log10(1 / MSE) over all pixels and channels (infinite for an exact reconstruction);
* SSIM (Wang et al. 2004): 11x11 Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03, data range 1,
  over the window positions that fit inside the image ("valid"), averaged over positions and RGB
  channels. Images smaller than 11 pixels use a window of their size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
