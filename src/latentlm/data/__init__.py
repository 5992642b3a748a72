"""Training data: image folders, the bundled digits, latent caches, and their batches as latents.

``build_dataset(DataConfig)`` picks the source. Image sources yield ``(image (3, S, S) float32 in
[-1, 1], label int)``; an ``ImageFolder`` yields a ``BadImage`` record instead for a file it cannot
decode (load batches with ``collate_skipping_bad``, which sets them aside). A latent cache
(``CachedLatents``) yields posterior moments of the image and of its flip. ``latent_source`` turns
either kind of batch into normalized latents (``sources.py``).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from latentlm.config import ConfigError, DataConfig
from latentlm.data.cache import CachedLatents, read_manifest, select_moments, write_cache
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
from latentlm.data.sources import ImageSource, MomentSource, latent_source


def build_dataset(cfg: DataConfig) -> Dataset:
    """The training set ``cfg`` describes. Raises ``ConfigError`` when it is unusable (e.g. empty)."""
    cfg.validate()
    if cfg.kind == "digits":
        return DigitsDataset(split="train", image_size=cfg.image_size)
    if cfg.kind == "cached":
        return CachedLatents(cfg.path)
    try:
        return ImageFolder(cfg.path, cfg.image_size, cfg.max_image_pixels)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(str(err)) from err


def data_num_classes(cfg: DataConfig) -> int:
    """How many classes the data of ``cfg`` has, without opening a single image: the class folders of an
    ImageFolder, a cache's class list, the digits' 10 (so options can be checked before any work)."""
    cfg.validate()
    if cfg.kind == "digits":
        return DigitsDataset.num_classes
    if cfg.kind == "cached":
        return len(read_manifest(cfg.path)["classes"])
    try:
        return len(ImageFolder.find_classes(cfg.path))
    except ValueError as err:
        raise ConfigError(str(err)) from err


def dataset_num_classes(dataset: Dataset) -> int | None:
    """Classes a dataset declares (``num_classes`` or ``len(classes)``), or None when it does not say."""
    n = getattr(dataset, "num_classes", None)
    if n is None and getattr(dataset, "classes", None) is not None:
        n = len(dataset.classes)
    return int(n) if n is not None else None


def class_names(dataset: Dataset, num_classes: int | None = None) -> list[str]:
    """Human-readable class names: the dataset's ``classes`` when it has ``num_classes`` of them, else the ids.

    ``num_classes`` defaults to what the dataset declares; ``ConfigError`` when it declares nothing.
    """
    num_classes = num_classes or dataset_num_classes(dataset)
    if num_classes is None:
        raise ConfigError("the dataset does not say how many classes it has (no `classes` or `num_classes`); set "
                          "--data.num-classes")
    names = getattr(dataset, "classes", None)
    if names is not None and len(names) == num_classes:
        return [str(n) for n in names]
    return [str(i) for i in range(num_classes)]


def subset_batches(dataset: Dataset, num_images: int, seed: int, batch_size: int, num_workers: int
                   ) -> Iterator[torch.Tensor]:
    """Image batches of a seeded random subset of ``num_images`` items (all when there are fewer), in index
    order, unreadable images left out: what normalization stats are fitted on. The global RNG is untouched."""
    count = min(num_images, len(dataset))
    pick = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:count].sort().values
    loader = DataLoader(Subset(dataset, pick.tolist()), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=collate_skipping_bad)
    for images, _, _ in loader:
        if images is not None:  # None: every image of the batch was unreadable
            yield images


__all__ = [
    "IMAGE_EXTENSIONS",
    "BadDataError",
    "BadImage",
    "CachedLatents",
    "DigitsDataset",
    "ImageFolder",
    "ImageSource",
    "MomentSource",
    "build_dataset",
    "center_crop_arr",
    "check_bad_fraction",
    "class_names",
    "collate_skipping_bad",
    "data_num_classes",
    "dataset_num_classes",
    "image_to_tensor",
    "latent_source",
    "load_image",
    "read_manifest",
    "scan_images",
    "select_moments",
    "subset_batches",
    "write_cache",
]
