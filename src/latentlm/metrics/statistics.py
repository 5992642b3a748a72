"""The Gaussian statistics and Fréchet distance every Fréchet metric here uses (FID, sFID, the digits').

``RunningMoments`` is the one mean/covariance estimator: float64 sums of deviations from a shift (the
first batch's mean), fed batch by batch, so any number of feature rows fits in O(F²) memory and the
covariance stays accurate when the features' mean is large against their spread. It equals
``np.mean`` / ``np.cov(rowvar=False)`` (torch-fidelity's estimator) to about 1e-12 relative.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg
import torch


class RunningMoments:
    """Mean and unbiased covariance of feature rows fed in batches, in float64."""

    def __init__(self) -> None:
        self.count = 0
        self.shift: torch.Tensor | None = None
        self.total: torch.Tensor | None = None
        self.outer: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        """Add rows x (B, F)."""
        x = x.double()
        if self.shift is None:
            self.shift = x.mean(dim=0)
            self.total = torch.zeros_like(self.shift)
            self.outer = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
        d = x - self.shift  # (B, F)
        self.count += len(x)
        self.total += d.sum(dim=0)
        self.outer += d.T @ d  # (F, F)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """``(mu (F,), sigma (F, F))`` float64, as ``np.mean`` / ``np.cov(rowvar=False)`` would give."""
        if self.count < 2:
            raise ValueError(f"{self.count} feature rows: need at least 2 for a covariance")
        mean_d = self.total / self.count
        sigma = (self.outer - self.count * torch.outer(mean_d, mean_d)) / (self.count - 1)
        return (self.shift + mean_d).cpu().numpy(), sigma.cpu().numpy()


def gaussian_statistics(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (F,) and unbiased covariance (F, F), float64, of features (N, F) with N >= 2."""
    x = torch.as_tensor(features).detach().cpu()
    if x.dim() != 2 or x.shape[0] < 2:
        raise ValueError(f"features of shape {tuple(x.shape)}: need (N, F) with N >= 2")
    moments = RunningMoments()
    moments.update(x)
    return moments.result()


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians N(mu1, sigma1) and N(mu2, sigma2), in float64:

        ‖mu1 − mu2‖² + tr(sigma1 + sigma2 − 2 (sigma1 sigma2)^{1/2}).

    The matrix square root is ``scipy.linalg.sqrtm`` (as in the TF FID code and torch-fidelity); when the
    product is singular (fewer samples than features) ``eps`` is added to both diagonals, and a negligible
    imaginary part from round-off is dropped (a large one raises ``ValueError``).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: the statistics do not match (mu {mu1.shape} vs {mu2.shape}, sigma "
                         f"{sigma1.shape} vs {sigma2.shape})")
    diff = mu1 - mu2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)  # singular products are handled below
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm has a large imaginary component {np.abs(covmean.imag).max():.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))
