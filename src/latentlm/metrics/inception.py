"""Inception metrics for FID-50K evaluation: FID, IS, sFID and precision/recall.

Every number comes from torch-fidelity's TF-ported InceptionV3 (``inception-v3-compat``, the
network of the TF FID/IS code and the ADM evaluator); IS and precision/recall are torch-fidelity's own
functions, and the Fréchet distances use ``latentlm.metrics.statistics`` (the same closed form with
scipy's ``sqrtm``; equal to torch-fidelity's FID to 1e-6, pinned in the tests):

* **FID**: Fréchet distance between Gaussians fitted to the 2048-d pool_3 features of the samples and
  the reference's ``mu``/``sigma``.
* **IS**: ``isc_features_to_metric`` on the unbiased 1008-way logits (10 splits, torch-fidelity's
  shuffle with seed 2020).
* **sFID** (Nash et al. 2021, as the ADM evaluator defines it): the same Fréchet distance on
  *spatial* features: the output of TF node ``mixed_6/conv`` — in torch-fidelity's module,
  ``Mixed_6d.branch1x1`` (1x1 conv + BN + ReLU, (N, 192, 17, 17)) — keeping the first 7 channels and
  flattening in NHWC order (as ADM's ``spatial[:, :, :, :7].reshape(N, -1)``): 17 * 17 * 7 = 2023
  features. Against the reference's ``mu_s``/``sigma_s`` when it has them, else its images.
* **precision / recall** (Kynkäänniemi et al. 2019, k = 3, as ADM and torch-fidelity): on pool_3
  features of the samples and of the reference's images (``arr_0``).

The Inception weights are read from a local file — ``--inception-weights`` or torch hub's cache
(``$TORCH_HOME/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth``); nothing is downloaded.
torch-fidelity takes seconds to import, so it is imported inside the functions that need it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latentlm.config import ConfigError
from latentlm.io import file_sha256, iter_npz_rows, npz_array_info, npz_keys
from latentlm.metrics.statistics import frechet_distance, gaussian_statistics
from latentlm.progress import progress_bar

log = logging.getLogger(__name__)

INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
INCEPTION_FILE = INCEPTION_URL.rsplit("/", 1)[1]
INCEPTION_SHA256_PREFIX = "6726825d"  # torch hub convention: the file name carries its sha256 prefix
POOL_DIM, LOGITS_DIM = 2048, 1008
SPATIAL_CHANNELS, SPATIAL_SIDE = 7, 17
SPATIAL_DIM = SPATIAL_SIDE * SPATIAL_SIDE * SPATIAL_CHANNELS  # 2023


# ---------------------------------------------------------------------------------------------
# Inception network
# ---------------------------------------------------------------------------------------------


def default_inception_path() -> Path:
    """Where torch hub (and so torch-fidelity) caches the Inception weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def resolve_inception_weights(path: str | None) -> Path:
    """The local Inception weights file: ``path``, else the torch hub cache. Never downloads.

    Raises ``ConfigError`` saying which file to put where when there is none, or when the file is not
    a plain tensor state dict (it is checked with ``torch.load(weights_only=True)`` before
    torch-fidelity unpickles it).
    """
    file = Path(path) if path else default_inception_path()
    if not file.is_file():
        where = f"--inception-weights {path}: no such file" if path else f"no Inception weights at {file}"
        raise ConfigError(
            f"{where}. latentlm never downloads them: fetch {INCEPTION_URL} on a machine with network and put "
            f"it at {default_inception_path()} (the torch hub cache; set TORCH_HOME to move it) or pass "
            "--inception-weights PATH")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # any unpickling failure means "not a plain tensor state dict"
        raise ConfigError(f"{file} is not a plain tensor state dict ({type(err).__name__}); refusing to load it. "
                          f"Use torch-fidelity's {INCEPTION_FILE}") from err
    if not isinstance(state, dict) or "Mixed_6d.branch1x1.conv.weight" not in state:
        raise ConfigError(f"{file} is not an InceptionV3 state dict in torch-fidelity's format ({INCEPTION_FILE})")
    return file


@dataclass
class Features:
    """Inception features of N images: ``pool`` (N, 2048), ``logits`` (N, 1008) unbiased, ``spatial`` (N, 2023)."""

    pool: torch.Tensor
    logits: torch.Tensor
    spatial: torch.Tensor


class InceptionFeatures:
    """torch-fidelity's ``FeatureExtractorInceptionV3`` plus a forward hook for the sFID features.

    Call it on uint8 images (N, H, W, 3) (numpy or torch); it resizes to 299 (TF1 bilinear) inside.
    """

    def __init__(self, weights: Path, device: torch.device | str = "cpu") -> None:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        self.device = torch.device(device)
        self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                               feature_extractor_weights_path=str(weights)).to(self.device)
        self._spatial: torch.Tensor | None = None
        # TF's mixed_6/conv is the 1x1 branch of the third 17x17 block (torch-fidelity's weight map:
        # mixed_6/conv/* -> Mixed_6d.branch1x1.*); its node output is after BN + ReLU.
        self.net.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> None:
        self._spatial = output  # (N, 192, 17, 17)

    @torch.no_grad()
    def __call__(self, images: np.ndarray | torch.Tensor) -> Features:
        x = torch.as_tensor(images).to(self.device)
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected uint8 images (N, H, W, 3), got {x.dtype} {tuple(x.shape)}")
        # Contiguous NCHW as torch-fidelity's DataLoader makes it: a permuted view would be channels-last
        # and could pick other convolution kernels (other rounding) than torch-fidelity's own run.
        x = x.permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W)
        pool, logits = self.net(x)  # (N, 2048), (N, 1008)
        spatial = self._spatial[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(len(x), -1)  # (N, 2023), NHWC
        return Features(pool.float().cpu(), logits.float().cpu(), spatial.float().cpu())


def extract_features(inception: InceptionFeatures, batches: Iterable[np.ndarray | torch.Tensor], total: int,
                     desc: str = "Inception", progress: bool = True) -> Features:
    """Features of all images in ``batches`` (uint8 (B, H, W, 3) each, ``total`` images in all)."""
    pool = torch.empty(total, POOL_DIM)
    logits = torch.empty(total, LOGITS_DIM)
    spatial = torch.empty(total, SPATIAL_DIM)
    done = 0
    with progress_bar(total=total, unit="img", desc=desc, disable=not progress, dynamic_ncols=True) as bar:
        for batch in batches:
            f = inception(batch)
            n = len(f.pool)
            pool[done:done + n], logits[done:done + n], spatial[done:done + n] = f.pool, f.logits, f.spatial
            done += n
            bar.update(n)
    if done != total:
        raise ValueError(f"{desc}: got {done} images, expected {total}")
    return Features(pool, logits, spatial)


# ---------------------------------------------------------------------------------------------
# Metrics on features (torch-fidelity's functions)
# ---------------------------------------------------------------------------------------------


def inception_score(logits: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """(mean, std) over ``splits`` of exp(E KL(p(y|x) ‖ p(y))), torch-fidelity's shuffle (seed 2020) included."""
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

    out = isc_features_to_metric(logits, splits=splits, shuffle=True, rng_seed=2020)
    return out[KEY_METRIC_ISC_MEAN], out[KEY_METRIC_ISC_STD]


def precision_recall(generated: torch.Tensor, real: torch.Tensor, neighborhood: int = 3,
                     batch_size: int = 10_000) -> tuple[float, float]:
    """Improved precision/recall: the fraction of ``generated`` inside the union of k-NN balls of ``real``
    and vice versa. Features (N, F) / (M, F); distances are computed in blocks of ``batch_size`` rows,
    on the GPU when there is one (so memory is bounded by batch_size x max(N, M))."""
    from torch_fidelity.metric_prc import calculate_precision_recall_part

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return calculate_precision_recall_part(generated.to(device), real.to(device), neighborhood, batch_size)


# ---------------------------------------------------------------------------------------------
# Image and reference files
# ---------------------------------------------------------------------------------------------


def check_image_npz(path: str | os.PathLike, what: str = "samples") -> tuple[int, int, int]:
    """``(N, H, W)`` of a ``.npz`` whose ``arr_0`` holds uint8 images (N, H, W, 3); else ``ConfigError``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} file {path} does not exist")
    try:
        keys = npz_keys(path)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    if "arr_0" not in keys:
        raise ConfigError(f"{path} has no arr_0 (arrays: {keys}); the ADM format stores images as arr_0, "
                          "uint8 (N, H, W, 3)")
    shape, dtype = npz_array_info(path, "arr_0")
    if dtype != np.uint8:
        raise ConfigError(f"{path}: arr_0 is {dtype}, expected uint8 images in 0..255; convert float images in "
                          "[-1, 1] with np.clip(np.round((x + 1) * 127.5), 0, 255).astype(np.uint8)")
    if len(shape) != 4 or shape[3] != 3 or shape[0] < 1:
        raise ConfigError(f"{path}: arr_0 has shape {shape}, expected (N, H, W, 3) with N >= 1 (NHWC RGB; "
                          "transpose NCHW arrays with .transpose(0, 2, 3, 1))")
    return shape[0], shape[1], shape[2]


@dataclass
class Reference:
    """A reference set: pool_3 statistics, optional spatial statistics, optional images (``arr_0``)."""

    path: Path
    sha256: str
    mu: np.ndarray  # (2048,)
    sigma: np.ndarray  # (2048, 2048)
    mu_s: np.ndarray | None  # (2023,)
    sigma_s: np.ndarray | None  # (2023, 2023)
    num_images: int  # rows of arr_0 (0: statistics only)

    def describe(self) -> dict[str, Any]:
        return {"path": str(self.path.resolve()), "sha256": self.sha256, "num_images": self.num_images,
                "has_spatial_statistics": self.mu_s is not None}


def load_reference(path: str | os.PathLike) -> Reference:
    """Read an ADM reference batch (``arr_0`` + ``mu``/``sigma`` [+ ``mu_s``/``sigma_s``]), a plain
    ``mu``/``sigma`` ``.npz``, or a ``latentlm reference-stats`` file. Raises ``ConfigError`` when it
    has no ``mu``/``sigma``, or arrays of the wrong shape or type."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"reference {path} does not exist; pass an ADM reference batch (e.g. "
                          "VIRTUAL_imagenet256_labeled.npz), a mu/sigma .npz, or make one with "
                          "`latentlm reference-stats`")
    try:
        keys = npz_keys(path)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    if "mu" not in keys or "sigma" not in keys:
        raise ConfigError(f"reference {path} has no 'mu'/'sigma' (arrays: {keys}); FID needs the reference's "
                          "Inception statistics: use an ADM reference batch or compute them with "
                          "`latentlm reference-stats --folder <real images>`")
    with np.load(path, allow_pickle=False) as data:
        stats = {k: data[k] for k in ("mu", "sigma", "mu_s", "sigma_s") if k in keys}
    expected = {"mu": (POOL_DIM,), "sigma": (POOL_DIM, POOL_DIM), "mu_s": (SPATIAL_DIM,),
                "sigma_s": (SPATIAL_DIM, SPATIAL_DIM)}
    for key, array in stats.items():
        if array.shape != expected[key] or not np.issubdtype(array.dtype, np.floating):
            raise ConfigError(f"reference {path}: {key} is {array.dtype} {array.shape}, expected float "
                              f"{expected[key]} (Inception pool_3 / mixed_6 statistics)")
        if not np.isfinite(array).all():
            raise ConfigError(f"reference {path}: {key} has NaN/inf values")
    num_images = check_image_npz(path, "reference")[0] if "arr_0" in keys else 0
    spatial = "mu_s" in stats and "sigma_s" in stats
    return Reference(path=path, sha256=file_sha256(path), mu=stats["mu"], sigma=stats["sigma"],
                     mu_s=stats["mu_s"] if spatial else None, sigma_s=stats["sigma_s"] if spatial else None,
                     num_images=num_images)


def inception_metrics(samples: Path, num_images: int, reference: Reference, inception: InceptionFeatures,
                      batch_size: int = 64, isc_splits: int = 10, neighborhood: int = 3,
                      progress: bool = True) -> dict[str, Any]:
    """FID, IS, and (when the reference allows) sFID and precision/recall of the first ``num_images`` of
    ``samples`` (``arr_0``). Images are streamed; features (about 20 KB per image) stay in memory."""
    feats = extract_features(inception, iter_npz_rows(samples, "arr_0", batch_size, limit=num_images), num_images,
                             desc="Inception (samples)", progress=progress)
    # The Fréchet distances take eigenvalues of 2048 x 2048 products: tens of seconds on a few CPU cores.
    log.info("Fréchet distances and Inception Score of %d images", num_images)
    is_mean, is_std = inception_score(feats.logits, isc_splits)
    metrics: dict[str, Any] = {
        "fid": frechet_distance(*gaussian_statistics(feats.pool), reference.mu, reference.sigma),
        "inception_score": is_mean,
        "inception_score_std": is_std,
        "sfid": None,
        "precision": None,
        "recall": None,
    }
    ref_feats = None
    if reference.num_images:
        ref_feats = extract_features(inception, iter_npz_rows(reference.path, "arr_0", batch_size),
                                     reference.num_images, desc="Inception (reference)", progress=progress)
        metrics["precision"], metrics["recall"] = precision_recall(feats.pool, ref_feats.pool, neighborhood)
    if reference.mu_s is not None:
        ref_spatial = reference.mu_s, reference.sigma_s
    elif ref_feats is not None:
        ref_spatial = gaussian_statistics(ref_feats.spatial)
    else:
        ref_spatial = None
    if ref_spatial is not None:
        metrics["sfid"] = frechet_distance(*gaussian_statistics(feats.spatial), *ref_spatial)
    return metrics
