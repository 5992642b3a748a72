"""Inception metrics for FID-50K evaluation: ``latentlm evaluate`` and ``latentlm reference-stats``.

Every number comes from torch-fidelity's TF-ported InceptionV3 (``inception-v3-compat``, the
network of the TF FID/IS code and the ADM evaluator) and torch-fidelity's own metric functions,
so our FID and IS equal ``torch_fidelity.calculate_metrics`` on the same images and weights:

* **FID**: Fréchet distance between Gaussians fitted to the 2048-d pool_3 features
  (``fid_statistics_to_metric``) of the samples and the reference's ``mu``/``sigma``.
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

import hashlib
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

import latentlm
from latentlm.checkpoint import atomic_write, read_json, resolve_checkpoint, write_json
from latentlm.config import ConfigError, EvaluateConfig, ReferenceStatsConfig
from latentlm.generate_many import (
    NpzWriter,
    existing_record,
    generate_many,
    iter_npz_rows,
    npz_array_info,
    npz_keys,
    output_paths,
)

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


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


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
    with tqdm(total=total, unit="img", desc=desc, disable=not progress, dynamic_ncols=True) as bar:
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


def gaussian_statistics(features: torch.Tensor) -> dict[str, np.ndarray]:
    """``{"mu": (F,), "sigma": (F, F)}`` of features (N, F), exactly as torch-fidelity's FID computes them."""
    from torch_fidelity.metric_fid import fid_features_to_statistics

    return fid_features_to_statistics(features.float().cpu())


def frechet_distance(stats1: dict[str, np.ndarray], stats2: dict[str, np.ndarray]) -> float:
    """‖mu1 − mu2‖² + tr(sigma1 + sigma2 − 2 (sigma1 sigma2)^{1/2}) via torch-fidelity's ``fid_statistics_to_metric``.

    Means of different dtypes (float32 from features, float64 from an ADM file) are both taken to float64.
    """
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    mu1, mu2 = np.asarray(stats1["mu"]), np.asarray(stats2["mu"])
    sigma1, sigma2 = np.asarray(stats1["sigma"]), np.asarray(stats2["sigma"])
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
                         f"{sigma2.shape}")
    if mu1.dtype != mu2.dtype:
        mu1, mu2 = mu1.astype(np.float64), mu2.astype(np.float64)
    if sigma1.dtype != sigma2.dtype:
        sigma1, sigma2 = sigma1.astype(np.float64), sigma2.astype(np.float64)
    return fid_statistics_to_metric({"mu": mu1, "sigma": sigma1}, {"mu": mu2, "sigma": sigma2},
                                    verbose=False)[KEY_METRIC_FID]


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
    gen_pool = gaussian_statistics(feats.pool)
    is_mean, is_std = inception_score(feats.logits, isc_splits)
    metrics: dict[str, Any] = {
        "fid": frechet_distance(gen_pool, {"mu": reference.mu, "sigma": reference.sigma}),
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
        ref_spatial = {"mu": reference.mu_s, "sigma": reference.sigma_s}
    elif ref_feats is not None:
        ref_spatial = gaussian_statistics(ref_feats.spatial)
    else:
        ref_spatial = None
    if ref_spatial is not None:
        metrics["sfid"] = frechet_distance(gaussian_statistics(feats.spatial), ref_spatial)
    return metrics


# ---------------------------------------------------------------------------------------------
# latentlm evaluate
# ---------------------------------------------------------------------------------------------


def digits_metrics(samples: Path, num_images: int, image_size: int, seed: int = 0) -> dict[str, float]:
    """The demo's digit-classifier metrics (``latentlm.evaluate.DigitsEvaluator``) of generated digits:
    class accuracy w.r.t. ``arr_1`` and the Fréchet distance to the real test digits beside its floor."""
    from latentlm.data.digits import DigitsDataset
    from latentlm.evaluate import DigitsEvaluator

    if "arr_1" not in npz_keys(samples):
        raise ConfigError(f"{samples} has no arr_1 (labels): the digits metrics score images against their class")
    with np.load(samples, allow_pickle=False) as data:
        images = torch.from_numpy(data["arr_0"][:num_images]).permute(0, 3, 1, 2).float() / 127.5 - 1  # (N, 3, S, S)
        labels = torch.from_numpy(data["arr_1"][:num_images]).long()  # (N,)
    train, test = DigitsDataset("train", image_size=image_size), DigitsDataset("test", image_size=image_size)
    evaluator = DigitsEvaluator.fit(train.images, train.labels, test.images, seed=seed)
    return evaluator.score(images, labels).as_dict()


def _checkpoint_data_kind(checkpoint: str) -> str | None:
    try:
        path = resolve_checkpoint(checkpoint)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(str(err)) from err
    return read_json(path / "config.json")["train"].get("data", {}).get("kind")


def evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    """``latentlm evaluate``: generate ``cfg.out`` if a checkpoint is given (resumable, all processes),
    then score it on the first process and write ``cfg.results``. Returns the results (``{}`` on other
    processes). Raises ``ConfigError`` for bad options before generating anything."""
    # Setup: every option is checked before minutes of generation -------------------------------------
    samples = Path(cfg.out)
    record = existing_record(samples)
    data_kind = _checkpoint_data_kind(cfg.checkpoint) if cfg.checkpoint else (
        record["settings"].get("data_kind") if record else None)
    digits = data_kind == "digits"
    if cfg.reference is None and not digits:
        raise ConfigError("--reference is required: an ADM reference batch (VIRTUAL_imagenet256_labeled.npz), a "
                          "mu/sigma .npz, or a file from `latentlm reference-stats` (only checkpoints trained on the "
                          "bundled digits can be scored without one)")
    if cfg.eval_images is not None and cfg.eval_images < 2:
        raise ConfigError(f"eval_images={cfg.eval_images}: need at least 2 images")
    if not cfg.checkpoint and not samples.is_file():
        raise ConfigError(f"samples {samples} do not exist: pass --checkpoint to generate them, or --out an "
                          "existing .npz")
    reference = load_reference(cfg.reference) if cfg.reference else None
    weights = resolve_inception_weights(cfg.inception_weights) if reference else None

    # Samples --------------------------------------------------------------------------------------------
    if cfg.checkpoint:
        generate_many(cfg)
        if int(os.environ.get("RANK", "0")) != 0:
            return {}
        record = existing_record(samples)
    available, height, width = check_image_npz(samples)
    num_images = available if cfg.eval_images is None else cfg.eval_images
    if num_images > available:
        raise ConfigError(f"{samples} holds {available} images but {num_images} were requested (--eval-images); "
                          "generate more (sample-many --per-class/--num-images) or lower --eval-images")
    if num_images < 2:
        raise ConfigError(f"{samples} holds {available} image(s): need at least 2")

    # Metrics ---------------------------------------------------------------------------------------------
    metrics: dict[str, Any] = {}
    if reference is not None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else (
            torch.device(cfg.device))
        inception = InceptionFeatures(weights, device)
        metrics.update(inception_metrics(samples, num_images, reference, inception, cfg.inception_batch_size,
                                         cfg.isc_splits, cfg.prc_neighborhood, cfg.progress))
    if digits:
        metrics["digits"] = digits_metrics(samples, num_images, height, seed=0)

    # Report ------------------------------------------------------------------------------------------------
    import torch_fidelity

    results = {
        "metrics": metrics,
        "samples": {"path": str(samples.resolve()), "num_images": num_images, "available": available,
                    "image_size": [height, width]},
        "generation": record["settings"] if record else None,  # checkpoint, sampler, steps, CFG, EMA, seed, N
        "reference": reference.describe() if reference else None,
        "inception": {"path": str(weights.resolve()), "sha256": file_sha256(weights),
                      "official": file_sha256(weights).startswith(INCEPTION_SHA256_PREFIX)} if weights else None,
        "settings": {"isc_splits": cfg.isc_splits, "isc_shuffle_seed": 2020, "prc_neighborhood": cfg.prc_neighborhood,
                     "inception_batch_size": cfg.inception_batch_size,
                     "sfid_features": "mixed_6/conv (Mixed_6d.branch1x1) channels 0..6, NHWC-flattened"},
        "versions": {"latentlm": latentlm.__version__, "torch": torch.__version__,
                     "torch_fidelity": torch_fidelity.__version__},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if results["inception"] and not results["inception"]["official"]:
        log.warning("Inception weights %s are not torch-fidelity's %s: scores are not comparable to published ones",
                    weights, INCEPTION_FILE)
    out = Path(cfg.results) if cfg.results else samples.with_suffix(".eval.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, results)
    print(format_metrics(metrics, num_images))
    print(f"results: {out}")
    return results


def format_metrics(metrics: dict[str, Any], num_images: int) -> str:
    """One line per metric, ``-`` for those the reference did not allow."""
    lines = [f"images scored: {num_images}"]
    for key, label in (("fid", "FID"), ("sfid", "sFID"), ("inception_score", "IS"), ("precision", "precision"),
                       ("recall", "recall")):
        if key in metrics:
            value = metrics[key]
            extra = f" ± {metrics['inception_score_std']:.2f}" if key == "inception_score" else ""
            lines.append(f"{label:>10}: " + ("-" if value is None else f"{value:.4f}{extra}"))
    for key, value in metrics.get("digits", {}).items():
        lines.append(f"{'digits ' + key:>21}: " + (f"{value}" if key == "num_images" else f"{value:.4f}"))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# latentlm reference-stats
# ---------------------------------------------------------------------------------------------


class RunningMoments:
    """Mean and unbiased covariance of feature rows fed in batches, in float64.

    Sums are taken around the first batch's mean, which keeps the covariance accurate when the
    features' mean is large against their spread. Memory: O(F²), whatever the number of rows.
    """

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


class _CroppedImages(Dataset):
    """uint8 (S, S, 3) images, decoded and ADM-centre-cropped exactly as the trainer does (``load_image``)."""

    def __init__(self, files: list[Path], image_size: int) -> None:
        self.files, self.image_size = files, image_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        from latentlm.data.images import BadImageError, load_image

        try:
            image = load_image(self.files[index], self.image_size)
        except BadImageError as err:  # a reference must be exact: no silently skipped files
            raise BadImageError(f"{self.files[index]}: {err}; remove it from the folder") from err
        return torch.from_numpy(np.asarray(image).copy())  # (S, S, 3) uint8


def _take_rows(batches: Iterator[torch.Tensor], count: int) -> Iterator[np.ndarray]:
    """The first ``count`` rows of ``batches`` (whose rest of the last batch is dropped)."""
    taken = 0
    while taken < count:
        batch = next(batches)[: count - taken]
        taken += len(batch)
        yield batch.numpy()


def reference_stats(cfg: ReferenceStatsConfig) -> Path:
    """``latentlm reference-stats``: Inception statistics of an ImageFolder as an ADM-style ``.npz``.

    Writes ``mu``/``sigma`` (pool_3), ``mu_s``/``sigma_s`` (sFID features), and ``arr_0`` (the first
    ``save_images`` images of the seeded order, uint8 NHWC) to ``cfg.out``, atomically, and the settings
    to a JSON beside it. Statistics are accumulated on the fly, so any number of images fits in memory.
    """
    # Setup ----------------------------------------------------------------------------------------
    from latentlm.data.images import ImageFolder

    if not cfg.out.endswith(".npz"):
        raise ConfigError(f"out={cfg.out}: must end in .npz")
    for name in ("image_size", "batch_size"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name}={getattr(cfg, name)}: must be >= 1")
    if cfg.save_images < 0 or (cfg.max_images is not None and cfg.max_images < 2):
        raise ConfigError(f"save_images={cfg.save_images} must be >= 0 and max_images={cfg.max_images} >= 2")
    try:
        folder = ImageFolder(cfg.folder, cfg.image_size)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(str(err)) from err
    weights = resolve_inception_weights(cfg.inception_weights)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else (
        torch.device(cfg.device))
    order = np.random.default_rng(cfg.seed).permutation(len(folder.samples))[: cfg.max_images]
    files = [folder.samples[i][0] for i in order]
    if len(files) < 2:
        raise ConfigError(f"{cfg.folder}: {len(files)} image(s); need at least 2 for a covariance")
    saved = min(cfg.save_images, len(files))
    loader = DataLoader(_CroppedImages(files, cfg.image_size), batch_size=cfg.batch_size,
                        num_workers=cfg.num_workers)
    inception = InceptionFeatures(weights, device)
    pool, spatial = RunningMoments(), RunningMoments()

    def batches() -> Iterator[torch.Tensor]:
        with tqdm(total=len(files), unit="img", desc="Inception (reference)", disable=not cfg.progress,
                  dynamic_ncols=True) as bar:
            for batch in loader:  # (B, S, S, 3) uint8
                f = inception(batch)
                pool.update(f.pool.to(device))
                spatial.update(f.spatial.to(device))
                bar.update(len(batch))
                yield batch

    # Statistics (and images) -----------------------------------------------------------------------------
    def write(tmp: Path) -> None:
        stream = batches()
        with NpzWriter(tmp) as npz:
            if saved:
                npz.write_stream("arr_0", (saved, cfg.image_size, cfg.image_size, 3), np.uint8,
                                 _take_rows(stream, saved))
            for _ in stream:  # the remaining images only feed the statistics
                pass
            for name, moments in (("", pool), ("_s", spatial)):
                mu, sigma = moments.result()
                npz.write(f"mu{name}", mu)
                npz.write(f"sigma{name}", sigma)

    out, record, _ = output_paths(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, write)
    write_json(record, {
        "folder": str(Path(cfg.folder).resolve()), "num_images": len(files), "saved_images": saved,
        "image_size": cfg.image_size, "crop": "ADM centre crop (latentlm.data.images.center_crop_arr)",
        "seed": cfg.seed, "inception": {"path": str(weights.resolve()), "sha256": file_sha256(weights)},
        "latentlm_version": latentlm.__version__, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })
    log.info("wrote %s: statistics of %d images (%d stored as arr_0)", out, len(files), saved)
    return out


__all__ = [
    "INCEPTION_FILE",
    "INCEPTION_URL",
    "Features",
    "InceptionFeatures",
    "Reference",
    "RunningMoments",
    "check_image_npz",
    "default_inception_path",
    "digits_metrics",
    "evaluate",
    "extract_features",
    "frechet_distance",
    "gaussian_statistics",
    "inception_metrics",
    "inception_score",
    "load_reference",
    "precision_recall",
    "reference_stats",
    "resolve_inception_weights",
]
