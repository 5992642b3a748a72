"""Training data: every source yields ``(image (3, S, S) float32 in [-1, 1], label int)``.

``build_dataset(DataConfig)`` picks the source; ``check_data_config`` validates the options without
touching the data (the trainer runs it before any heavy work). An ``ImageFolder`` yields a
``BadImage`` record instead for a file it cannot decode; load batches with ``collate_skipping_bad``,
which sets them aside. A dataset may also say ``yields_latents = True``: its items are then raw
latents (C, H, W) of the run's tokenizer instead of images (the trainer only normalizes them); or
``yields_moments = True`` (a latent cache, ``CachedLatents``): items are posterior moments of the
image and of its flip, from which the trainer draws the flip and the posterior sample.
"""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from latentlm.config import ConfigError, DataConfig
from latentlm.data.cache import CachedLatents, cache_latents, read_manifest, select_moments
from latentlm.data.digits import DigitsDataset
from latentlm.data.images import (
    IMAGE_EXTENSIONS,
    BadDataError,
    BadImage,
    ImageFolder,
    center_crop_arr,
    check_bad_fraction,
    collate_skipping_bad,
    image_to_tensor,
    load_image,
    scan_images,
)

DATA_KINDS = ("folder", "digits", "cached")


def check_data_config(cfg: DataConfig) -> None:
    """Raise ``ConfigError`` naming the bad option; cheap (stats one directory at most)."""
    if cfg.kind not in DATA_KINDS:
        raise ConfigError(f"data.kind={cfg.kind!r}: choose one of {', '.join(DATA_KINDS)}")
    if cfg.image_size < 1:
        raise ConfigError(f"data.image_size={cfg.image_size}: must be >= 1")
    if cfg.num_workers < 0:
        raise ConfigError(f"data.num_workers={cfg.num_workers}: must be >= 0")
    if cfg.num_classes is not None and cfg.num_classes < 1:
        raise ConfigError(f"data.num_classes={cfg.num_classes}: must be >= 1 (or unset to use the data's)")
    if not 0 <= cfg.max_bad_fraction <= 1:
        raise ConfigError(f"data.max_bad_fraction={cfg.max_bad_fraction}: must be in [0, 1]")
    if cfg.max_image_pixels < 1:
        raise ConfigError(f"data.max_image_pixels={cfg.max_image_pixels}: must be >= 1")
    if cfg.kind == "folder":
        if not cfg.path:
            raise ConfigError("data.kind=folder needs --data.path (an ImageFolder root: one sub-folder per class)")
        if not Path(cfg.path).is_dir():
            raise ConfigError(f"data.path={cfg.path}: no such directory (expected an ImageFolder root)")
    if cfg.kind == "cached":
        if not cfg.path:
            raise ConfigError("data.kind=cached needs --data.path (a directory written by `latentlm cache-latents`)")
        read_manifest(cfg.path)  # a complete cache, else says what to do


def build_dataset(cfg: DataConfig) -> Dataset:
    """The training set ``cfg`` describes. Raises ``ConfigError`` when it is unusable (e.g. empty)."""
    check_data_config(cfg)
    if cfg.kind == "digits":
        return DigitsDataset(split="train", image_size=cfg.image_size)
    if cfg.kind == "cached":
        return CachedLatents(cfg.path)
    try:
        return ImageFolder(cfg.path, cfg.image_size, cfg.max_image_pixels)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(str(err)) from err


def class_names(dataset: Dataset, num_classes: int) -> list[str]:
    """Human-readable class names: the dataset's ``classes`` when it has them, else the ids."""
    names = getattr(dataset, "classes", None)
    if names is not None and len(names) == num_classes:
        return [str(n) for n in names]
    return [str(i) for i in range(num_classes)]


def dataset_num_classes(dataset: Dataset) -> int | None:
    """Classes a dataset declares (``num_classes`` or ``len(classes)``), or None when it does not say."""
    n = getattr(dataset, "num_classes", None)
    if n is None and getattr(dataset, "classes", None) is not None:
        n = len(dataset.classes)
    return int(n) if n is not None else None


__all__ = [
    "DATA_KINDS",
    "IMAGE_EXTENSIONS",
    "BadDataError",
    "BadImage",
    "CachedLatents",
    "DigitsDataset",
    "ImageFolder",
    "build_dataset",
    "cache_latents",
    "center_crop_arr",
    "check_bad_fraction",
    "check_data_config",
    "class_names",
    "collate_skipping_bad",
    "dataset_num_classes",
    "image_to_tensor",
    "load_image",
    "read_manifest",
    "scan_images",
    "select_moments",
]
