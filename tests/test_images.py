"""ImageFolder with bad files: every readable image once per epoch, converted right; every unreadable one named."""

from __future__ import annotations

import dataclasses
import io
import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, RandomSampler

from latentlm.cli import main
from latentlm.data import BadDataError, BadImage, ImageFolder, collate_skipping_bad, load_image
from latentlm.data.images import BadImageError, to_rgb
from latentlm.training.loop import ShardedBatchSampler
from latentlm.training.model import train
from train_helpers import tiny_config

SIZE = 8  # crop size
LIMIT = 64 * 64  # max_image_pixels of these tests


def _png(width: int, height: int, bit_depth: int, colour_type: int, raw_rows: bytes) -> bytes:
    """A PNG file from raw (filter byte + pixels) rows; lets the tests write what Pillow cannot."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw_rows))
            + chunk(b"IEND", b""))


def _rgb(value) -> np.ndarray:
    return np.full((SIZE, SIZE, 3), value, np.float64)


def make_mixed_folder(root: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Two classes of good and bad files. Returns ({good relative path: expected 8-bit RGB (S, S, 3)},
    {bad relative path: a phrase of its reason})."""
    good, bad = {}, {}
    a, b = root / "a", root / "b"
    a.mkdir(parents=True)
    (b / "nested").mkdir(parents=True)

    Image.new("RGB", (12, 12), (200, 30, 60)).save(a / "rgb.png")
    good["a/rgb.png"] = _rgb((200, 30, 60))
    Image.new("RGB", (16, 16), (200, 30, 60)).convert("CMYK").save(a / "cmyk.jpg", quality=95)
    good["a/cmyk.jpg"] = _rgb((200, 30, 60))
    grey16 = np.full((10, 10), 40000, np.uint16)  # 16-bit: clipping would give 255
    Image.fromarray(grey16).save(a / "grey16.png")
    good["a/grey16.png"] = _rgb(round(40000 / 257))
    row = struct.pack(">" + "HHH" * 10, *([40000, 20000, 1000] * 10))
    (a / "rgb16.png").write_bytes(_png(10, 10, 16, 2, (b"\x00" + row) * 10))
    good["a/rgb16.png"] = _rgb((40000 / 257, 20000 / 257, 1000 / 257))
    rgba = np.zeros((9, 9, 4), np.uint8)
    rgba[..., :3] = (10, 200, 30)  # fully transparent: alpha is dropped, the colour stays
    Image.fromarray(rgba, "RGBA").save(a / "rgba.png")
    good["a/rgba.png"] = _rgb((10, 200, 30))
    palette = Image.new("P", (8, 8), 3)
    palette.putpalette([0, 0, 0] * 3 + [90, 120, 250] + [0, 0, 0] * 252)
    palette.save(a / "palette.png", transparency=3)
    good["a/palette.png"] = _rgb((90, 120, 250))
    Image.new("RGB", (1, 1), (5, 250, 128)).save(a / "one.png")  # 1x1: upscaled, still an image
    good["a/one.png"] = _rgb((5, 250, 128))
    Image.new("LA", (8, 8), (77, 0)).save(b / "la.png")
    good["b/la.png"] = _rgb(77)
    Image.fromarray(np.full((8, 8), 0.5, np.float32), "F").save(b / "float.tif")
    good["b/float.tif"] = _rgb(128)  # [0, 1] floats scaled by 255
    Image.fromarray(np.full((8, 8), 65535, np.int32), "I").save(b / "int32.tif")
    good["b/int32.tif"] = _rgb(255)
    Image.new("RGB", (40, 20), (1, 2, 3)).save(b / "nested" / "wide.jpg", quality=100)  # box-halved, then cropped
    good["b/nested/wide.jpg"] = _rgb((1, 2, 3))
    Image.new("L", (8, 8), 33).save(b / "grey.bmp")
    good["b/grey.bmp"] = _rgb(33)

    (a / "empty.png").write_bytes(b"")
    bad["a/empty.png"] = "cannot identify image file"
    (a / "garbage.jpg").write_bytes(b"this is not a JPEG" * 20)
    bad["a/garbage.jpg"] = "cannot identify image file"
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), np.uint8)).save(buffer, "JPEG")
    (b / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    bad["b/truncated.jpg"] = "truncated"
    Image.new("RGB", (100, 100)).save(b / "over_limit.png")
    bad["b/over_limit.png"] = "exceeds max_image_pixels=4096"
    (b / "bomb.png").write_bytes(_png(50_000, 50_000, 8, 2, b"\x00" * 4))  # 2.5 gigapixels claimed, never allocated
    bad["b/bomb.png"] = "decompression bomb"
    Image.new("RGB", (1, 100)).save(b / "thin.png")  # its short side upscaled to 8 would be 8 x 800
    bad["b/thin.png"] = "upscaling the short side"
    return good, bad


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    good, bad = make_mixed_folder(root)
    return root, good, bad


def _as_uint8(image: torch.Tensor) -> np.ndarray:
    return ((image.permute(1, 2, 0).numpy().astype(np.float64) + 1) * 127.5)


@pytest.mark.parametrize("workers", [0, 2])
def test_every_good_image_once_per_epoch_and_every_bad_one_named(mixed, workers):
    root, good, bad = mixed
    dataset = ImageFolder(root, SIZE, max_image_pixels=LIMIT)
    assert dataset.classes == ["a", "b"] and len(dataset) == len(good) + len(bad)
    by_path = {str(p.relative_to(root)): i for i, (p, _) in enumerate(dataset.samples)}
    expected = {by_path[k]: v for k, v in good.items()}
    # Identify each loaded image by a marker: its dataset index written into the label.
    indexed = _WithIndex(dataset)
    sampler = RandomSampler(indexed, generator=torch.Generator().manual_seed(0))
    loader = DataLoader(indexed, batch_size=3, sampler=sampler, num_workers=workers, collate_fn=collate_skipping_bad)
    for _ in range(2):  # two epochs
        seen, named = [], {}
        for images, labels, records in loader:
            assert all(isinstance(r, BadImage) for r in records)
            named.update({str(Path(r.path).relative_to(root)): r.reason for r in records})
            if images is None:
                continue
            assert images.shape == (len(labels), 3, SIZE, SIZE) and images.dtype == torch.float32
            assert images.min() >= -1 and images.max() <= 1
            for image, index in zip(images, labels.tolist(), strict=True):
                seen.append(index)
                tolerance = 7 if dataset.samples[index][0].suffix == ".jpg" else 1  # JPEG is lossy
                np.testing.assert_allclose(_as_uint8(image), expected[index], atol=tolerance,
                                           err_msg=str(dataset.samples[index][0]))
        assert sorted(seen) == sorted(expected)  # each good image exactly once
        assert named.keys() == bad.keys()
        for path, phrase in bad.items():
            assert phrase.lower() in named[path].lower(), (path, named[path])


class _WithIndex(torch.utils.data.Dataset):
    def __init__(self, base: ImageFolder) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        item = self.base[i]
        return item if isinstance(item, BadImage) else (item[0], i)


def test_load_image_conversions_and_crop():
    grey16 = Image.fromarray(np.array([[0, 257, 65535]], np.uint16))
    assert grey16.mode == "I;16"
    assert np.asarray(to_rgb(grey16))[0, :, 0].tolist() == [0, 1, 255]  # Pillow's own convert gives 0, 255, 255
    assert np.asarray(grey16.convert("RGB"))[0, :, 0].tolist() == [0, 255, 255]
    assert to_rgb(Image.new("RGB", (2, 2))).mode == "RGB"


def test_scan_images_cli_lists_bad_files_and_exits_1(mixed, tmp_path, capsys):
    root, _, bad = mixed
    listing = tmp_path / "bad.txt"
    with pytest.raises(SystemExit) as exit_info:
        main(["scan-images", "--data.path", str(root), "--data.image-size", str(SIZE), "--data.max-image-pixels",
              str(LIMIT), "--data.num-workers", "0", "--no-progress", "--out", str(listing)])
    assert exit_info.value.code == 1
    printed = capsys.readouterr().out.splitlines()
    assert sorted(str(Path(line.split("\t")[0]).relative_to(root)) for line in printed) == sorted(bad)
    assert listing.read_text().splitlines() == printed

    clean = tmp_path / "clean" / "c"
    clean.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(clean / "x.png")
    with pytest.raises(SystemExit) as exit_info:
        main(["scan-images", "--data.path", str(clean.parent), "--data.image-size", "8", "--data.num-workers", "0",
              "--no-progress"])
    assert exit_info.value.code == 0


def test_bomb_is_refused_from_the_header_with_a_clear_message(mixed):
    root, _, _ = mixed
    with pytest.raises(BadImageError, match="decompression bomb"):
        load_image(root / "b" / "bomb.png", SIZE)  # Pillow's default limit: refused before any allocation
    with pytest.raises(BadImageError, match="100x100 = 10000 pixels exceeds max_image_pixels=4096"):
        load_image(root / "b" / "over_limit.png", SIZE, max_pixels=LIMIT)


def _all_bad_micro_batch_seed(dataset: ImageFolder, bad: set[int], micro_batches: int) -> int:
    """A seed whose first ``micro_batches`` micro-batches (of 2) include one holding only unreadable images."""
    for seed in range(200):
        sampler = iter(ShardedBatchSampler(len(dataset), 2, 0, 1, seed))
        if any(set(next(sampler)) <= bad for _ in range(micro_batches)):
            return seed
    raise AssertionError("no such seed")


def test_training_skips_bad_images_and_resumes_exactly(mixed, tmp_path, caplog):
    root, good, bad = mixed
    dataset = ImageFolder(root, SIZE, max_image_pixels=LIMIT)
    bad_indices = {i for i, (p, _) in enumerate(dataset.samples) if str(p.relative_to(root)) in bad}
    seed = _all_bad_micro_batch_seed(dataset, bad_indices, 12)  # exercises the zero-weight micro-batch

    def config(out, **overrides):
        cfg = tiny_config(out, root, max_steps=6, seed=seed, **overrides)
        return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, image_size=SIZE, max_bad_fraction=0.5,
                                                                 max_image_pixels=LIMIT))

    with caplog.at_level(logging.WARNING, logger="latentlm"):
        straight = train(config(tmp_path / "a"))
    assert straight.step == 6 and all(np.isfinite(straight.losses))
    # 6 steps x 2 micro-batches of 2 from 18 files: the first epoch (9 micro-batches) and 3 of the second.
    assert straight.bad_images == sum(i in bad_indices for i in _drawn(dataset, seed, 12))
    for path in bad:
        assert f"skipped unreadable image {root / path}" in caplog.text
    first = train(config(tmp_path / "b", stop_at_step=3))
    resumed = train(config(tmp_path / "b", resume="auto"))
    assert first.step == 3 and resumed.losses == straight.losses and resumed.bad_images == straight.bad_images
    for name, p in straight.model.state_dict().items():
        assert torch.equal(p, resumed.model.state_dict()[name]), name


def _drawn(dataset: ImageFolder, seed: int, micro_batches: int) -> list[int]:
    sampler = iter(ShardedBatchSampler(len(dataset), 2, 0, 1, seed))
    return [i for _ in range(micro_batches) for i in next(sampler)]


def test_too_many_bad_images_stop_the_run(mixed, tmp_path):
    root, _, _ = mixed
    cfg = tiny_config(tmp_path, root, max_steps=20)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, max_bad_fraction=0.05, max_image_pixels=LIMIT))
    with pytest.raises(BadDataError, match=r"of 18 images are unreadable, more than data.max_bad_fraction=0.05; "
                                           r"e\.g\. .*latentlm scan-images"):
        train(cfg)
