"""The embedded default dataset: scikit-learn's bundled handwritten digits (no download).

1,797 grayscale images of 8x8 pixels (values 0..16) in 10 classes ship inside scikit-learn.
They are scaled to [-1, 1], resized to ``image_size`` (bilinear, 16 by default) and split once
into a fixed, class-stratified train/test partition (seeded, about 80/20) so every run and every
machine sees the same two sets.

Images come out with 3 identical channels by default because the tokenizer interface takes RGB
images (N, 3, S, S); ``channels=1`` gives the single gray channel for code that wants it.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

Split = Literal["train", "test", "all"]

NUM_CLASSES = 10
NUM_IMAGES = 1797
SPLIT_SEED = 0  # fixes the train/test partition for good; changing it changes every published number
TEST_FRACTION = 0.2


def load_digit_arrays() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as ``(images (1797, 8, 8) float32 in [-1, 1], labels (1797,) int64)``."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn: reads a local file

    bunch = load_digits()
    images = bunch.images.astype(np.float32) / 8.0 - 1.0  # 0..16 -> [-1, 1]
    return images, bunch.target.astype(np.int64)


def split_indices(labels: np.ndarray, test_fraction: float = TEST_FRACTION, seed: int = SPLIT_SEED
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Class-stratified ``(train_idx, test_idx)``, each sorted, from a seeded permutation per class."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(round(len(idx) * test_fraction))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def resize_digits(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """Bilinear resize of (N, 1, 8, 8) images in [-1, 1] to (N, 1, S, S), clamped to [-1, 1]."""
    if image_size == images.shape[-1]:
        return images.clone()
    out = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return out.clamp(-1.0, 1.0)


class DigitsDataset(Dataset):
    """``(image (channels, S, S) float32 in [-1, 1], label int)`` pairs from the bundled digits.

    Args:
        split: "train" (1,438 images), "test" (359 images) or "all" (1,797).
        image_size: output side S (bilinear from 8x8); 16 is the demo's choice.
        channels: 3 (gray replicated, what tokenizers take) or 1.

    The whole split is resized once at construction and held as one tensor (a few MB), so
    ``images`` and ``labels`` can also be used directly as batched tensors.
    """

    num_classes = NUM_CLASSES

    def __init__(self, split: Split = "train", image_size: int = 16, channels: int = 3) -> None:
        if split not in ("train", "test", "all"):
            raise ValueError(f"split={split!r}: must be 'train', 'test' or 'all'")
        if channels not in (1, 3):
            raise ValueError(f"channels={channels}: must be 1 or 3")
        if image_size < 1:
            raise ValueError(f"image_size={image_size}: must be >= 1")
        images, labels = load_digit_arrays()
        if split != "all":
            train_idx, test_idx = split_indices(labels)
            keep = train_idx if split == "train" else test_idx
            images, labels = images[keep], labels[keep]
        x = resize_digits(torch.from_numpy(images)[:, None], image_size)  # (N, 1, S, S)
        self.images = x.expand(-1, channels, -1, -1).contiguous()  # (N, channels, S, S)
        self.labels = torch.from_numpy(labels)  # (N,) int64
        self.split = split
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])
