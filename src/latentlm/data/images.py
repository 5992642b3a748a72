"""Images from an ImageFolder tree (one sub-folder per class), ADM centre-cropped to [-1, 1] tensors."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

IMAGE_EXTENSIONS = (".bmp", ".jpeg", ".jpg", ".png", ".ppm", ".tif", ".tiff", ".webp")


def center_crop_arr(image: Image.Image, image_size: int) -> Image.Image:
    """ADM's crop: BOX-halve while the short side is >= 2 x image_size, BICUBIC-resize the short side
    to image_size, then take the centre image_size x image_size square.

    Halving with a box filter first avoids the aliasing of one large bicubic downscale.
    """
    while min(image.size) >= 2 * image_size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = image_size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    left = (image.size[0] - image_size) // 2
    top = (image.size[1] - image_size) // 2
    return image.crop((left, top, left + image_size, top + image_size))


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a float32 tensor (3, H, W) in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)  # (H, W, 3) in [0, 255]
    return torch.from_numpy(array).permute(2, 0, 1).div(127.5).sub(1.0).contiguous()


class ImageFolder(Dataset):
    """``(image (3, S, S) float32 in [-1, 1], label int)`` from ``root/<class>/<file>``.

    Classes are the sorted sub-folder names (label = position in that list); files are those
    with an image extension, searched recursively inside each class folder, in sorted order.
    Augmentation (the horizontal flip) is the trainer's job, so an item is a pure function of
    its index.
    """

    def __init__(self, root: str | os.PathLike, image_size: int) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"ImageFolder root {self.root} is not a directory")
        self.image_size = image_size
        self.classes = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not self.classes:
            raise ValueError(f"{self.root} has no class sub-folders; expected root/<class name>/<images>")
        self.samples: list[tuple[Path, int]] = []
        for label, name in enumerate(self.classes):
            files = sorted(p for p in (self.root / name).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
            self.samples.extend((p, label) for p in files)
        if not self.samples:
            raise ValueError(f"{self.root}: no images with extensions {IMAGE_EXTENSIONS} in its class folders")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        with Image.open(path) as image:
            image = center_crop_arr(image.convert("RGB"), self.image_size)
        return image_to_tensor(image), label
