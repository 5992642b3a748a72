"""``latentlm reference-stats``: Inception statistics of an ImageFolder as an ADM-style reference ``.npz``."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

import latentlm
from latentlm.config import ConfigError, ReferenceStatsConfig
from latentlm.data.images import BadImageError, ImageFolder, load_image
from latentlm.distributed import resolve_device
from latentlm.io import NpzWriter, atomic_write, check_writable, file_sha256, write_json
from latentlm.metrics.inception import InceptionFeatures, resolve_inception_weights
from latentlm.metrics.statistics import RunningMoments

log = logging.getLogger(__name__)


class _CroppedImages(Dataset):
    """uint8 (S, S, 3) images, decoded and ADM-centre-cropped exactly as the trainer does (``load_image``)."""

    def __init__(self, files: list[Path], image_size: int) -> None:
        self.files, self.image_size = files, image_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
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
    cfg.validate()
    check_writable(Path(cfg.out).parent, "--out")
    try:
        folder = ImageFolder(cfg.folder, cfg.image_size)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(str(err)) from err
    weights = resolve_inception_weights(cfg.inception_weights)
    device = resolve_device(cfg.device)
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

    out, record = Path(cfg.out), Path(cfg.out).with_suffix(".json")
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


def run(cfg: ReferenceStatsConfig) -> int:
    reference_stats(cfg)
    return 0
