"""Images from an ImageFolder tree (one sub-folder per class), ADM centre-cropped to [-1, 1] tensors.

Unreadable files never crash a run or a DataLoader worker. ``ImageFolder[i]`` is ``(image, label)``
for a file that decodes and a ``BadImage`` record (index, path, reason) for one that does not: empty,
garbage, truncated, an unsupported mode, or larger than ``max_image_pixels`` (decompression bombs are
refused from the header, before any pixel is allocated). ``collate_skipping_bad`` drops the records
from a batch and hands them to the caller, who logs and counts them; ``scan_images`` lists them all
up front (``latentlm scan-images``).

Colour handling (``to_rgb``): every mode becomes 8-bit RGB. 16-bit greyscale (``I;16*``) and 32-bit
integer (``I``) images are divided by 257 (65535 -> 255) instead of being clipped, so they do not
saturate; float (``F``) images in [0, 1] are scaled by 255. Alpha (RGBA, LA, PA, transparent palettes)
is dropped, not composited: that is what ADM's and torchvision's loaders do, so latents, training
images and FID reference statistics all see the same pixels. CMYK, palette, 1-bit and YCbCr go
through Pillow's conversion.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate

from latentlm.config import ConfigError
from latentlm.progress import progress_bar

IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".ppm", ".tif", ".tiff", ".webp")  # GIF: first frame
# Pillow's own default (about 0.25 GiB of 8-bit RGB). Pillow itself raises above twice this, so a
# larger limit also needs PIL.Image.MAX_IMAGE_PIXELS raised.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485


class BadImageError(Exception):
    """A file that cannot be used as a training image; the message says why."""


class BadDataError(ConfigError):
    """Too many unreadable images: the data (or its mount) needs fixing before training goes on."""


@dataclass(frozen=True)
class BadImage:
    """What ``ImageFolder[index]`` returns for a file that cannot be decoded."""

    index: int  # dataset index
    path: str
    reason: str


# ---------------------------------------------------------------------------------------------
# One image: decode, convert, crop
# ---------------------------------------------------------------------------------------------


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


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any Pillow mode, without saturating high-bit-depth images (see the module docstring)."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        array = np.asarray(image, dtype=np.float64)  # (H, W)
        if image.mode == "F":
            finite = array[np.isfinite(array)]
            if finite.size and finite.min() >= 0 and finite.max() <= 1:
                array = array * 255.0  # float images in [0, 1]
        else:
            array = array / 257.0  # 16-bit range: 65535 -> 255, 257 -> 1
        grey = np.clip(np.nan_to_num(np.round(array)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    with warnings.catch_warnings():
        # "Palette images with Transparency expressed in bytes should be converted to RGBA": we drop alpha anyway.
        warnings.filterwarnings("ignore", message="Palette images with Transparency")
        return image.convert("RGB")


def load_image(path: str | os.PathLike, image_size: int, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode ``path`` to 8-bit RGB and ADM-crop it to ``image_size`` x ``image_size``.

    Raises ``BadImageError`` (never anything else) when the file cannot be used: not an image, truncated,
    an unconvertible mode, more than ``max_pixels`` pixels (checked from the header, before decoding), or a
    shape so elongated that upscaling its short side to ``image_size`` would exceed ``max_pixels``.
    """
    try:
        with warnings.catch_warnings():
            # Our own limit (below) replaces Pillow's warning; Pillow still raises above twice its limit.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise BadImageError(
                        f"{width}x{height} = {width * height} pixels exceeds max_image_pixels={max_pixels}; refused "
                        "unread as a possible decompression bomb (if the file is trusted, raise that limit)")
                resized = math.ceil(max(width, height) * image_size / min(width, height)) * image_size
                if min(width, height) < image_size and resized > max_pixels:
                    raise BadImageError(f"{width}x{height}: upscaling the short side to {image_size} would make "
                                        f"{resized} pixels (> max_image_pixels={max_pixels})")
                image.load()  # the full decode: truncated or corrupt data fails here
                rgb = to_rgb(image)
        return center_crop_arr(rgb, image_size)
    except BadImageError:
        raise
    except Image.DecompressionBombError as err:
        raise BadImageError(f"refused unread as a possible decompression bomb: {err}") from err
    except Exception as err:  # Pillow plugins raise many types (OSError, SyntaxError, struct.error, ...)
        raise BadImageError(f"{type(err).__name__}: {err}") from err


def is_image_file(path: Path) -> bool:
    """A file (not a directory, whatever its name) with an image extension."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


# ---------------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------------


class ImageFolder(Dataset):
    """``(image (3, S, S) float32 in [-1, 1], label int)`` from ``root/<class>/<file>``.

    Classes are the sorted sub-folder names (label = position in that list); files are those
    with an image extension, searched recursively inside each class folder, in sorted order.
    An unreadable file gives a ``BadImage`` record instead of a pair (use ``collate_skipping_bad``).
    Augmentation (the horizontal flip) is the trainer's job, so an item is a pure function of
    its index.
    """

    def __init__(self, root: str | os.PathLike, image_size: int,
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"ImageFolder root {self.root} is not a directory")
        self.image_size = image_size
        self.max_image_pixels = max_image_pixels
        self.classes = self.find_classes(self.root)
        self.samples: list[tuple[Path, int]] = []
        for label, name in enumerate(self.classes):
            files = sorted(p for p in (self.root / name).rglob("*") if is_image_file(p))
            self.samples.extend((p, label) for p in files)
        if not self.samples:
            raise ValueError(f"{self.root}: no images with extensions {IMAGE_EXTENSIONS} in its class folders")

    @staticmethod
    def find_classes(root: str | os.PathLike) -> list[str]:
        """The class names of an ImageFolder root: its sub-folders (hidden ones excluded), sorted."""
        root = Path(root)
        classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not classes:
            raise ValueError(f"{root} has no class sub-folders; expected root/<class name>/<images>")
        return classes

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        """``(image, label)``; raises ``BadImageError`` for an unreadable file."""
        path, label = self.samples[index]
        return image_to_tensor(load_image(path, self.image_size, self.max_image_pixels)), label

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | BadImage:
        try:
            return self.load(index)
        except BadImageError as err:
            return BadImage(index, str(self.samples[index][0]), str(err))


# ---------------------------------------------------------------------------------------------
# Batches with unreadable files, and the up-front scan
# ---------------------------------------------------------------------------------------------


def collate_skipping_bad(items: Sequence[Any]) -> tuple[Any, torch.Tensor | None, list[BadImage]]:
    """DataLoader ``collate_fn``: ``(inputs, labels, bad)`` with the ``BadImage`` records left out of
    ``inputs``/``labels`` (collated as usual) and returned in ``bad``. Both are None when every item
    was bad. Items of other datasets pass through unchanged, with ``bad`` empty."""
    bad = [item for item in items if isinstance(item, BadImage)]
    good = [item for item in items if not isinstance(item, BadImage)]
    if not good:
        return None, None, bad
    inputs, labels = default_collate(good)
    return inputs, labels, bad


def _only_bad(items: Sequence[Any]) -> tuple[int, list[BadImage]]:
    return len(items), [item for item in items if isinstance(item, BadImage)]  # no pixels cross the worker pipe


def scan_images(dataset: ImageFolder, num_workers: int = 4, batch_size: int = 64, progress: bool = True
                ) -> list[BadImage]:
    """Decode and crop every image exactly as training does; the unreadable ones, in index order."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=_only_bad)
    bad: list[BadImage] = []
    with progress_bar(total=len(dataset), unit="img", desc="scan", disable=not progress, dynamic_ncols=True) as bar:
        for count, records in loader:
            bad.extend(records)
            bar.update(count)
    return sorted(bad, key=lambda b: b.index)


def check_bad_fraction(bad: int, total: int, max_fraction: float, examples: Sequence[BadImage] = (),
                       where: str = "") -> None:
    """Raise ``BadDataError`` when ``bad`` of ``total`` images is more than ``max_fraction`` of them."""
    if bad <= max_fraction * total:
        return
    named = "; ".join(f"{b.path} ({b.reason})" for b in list(examples)[:5])
    raise BadDataError(
        f"{where}{bad} of {total} images are unreadable, more than data.max_bad_fraction={max_fraction}"
        + (f"; e.g. {named}" if named else "")
        + ". List them all with `latentlm scan-images --data.path ...`, then fix or remove them, "
        "or raise --data.max-bad-fraction")


__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "IMAGE_EXTENSIONS",
    "BadDataError",
    "BadImage",
    "BadImageError",
    "ImageFolder",
    "center_crop_arr",
    "check_bad_fraction",
    "collate_skipping_bad",
    "image_to_tensor",
    "is_image_file",
    "load_image",
    "scan_images",
    "to_rgb",
]
