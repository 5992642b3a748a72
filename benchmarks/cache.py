"""Training throughput from a latent cache vs encoding images on the fly.

Both runs do what ``latentlm train`` does per step: draw a micro-batch (``ShardedBatchSampler``, a
DataLoader with worker processes), turn it into normalized latents (``latentlm.data.latent_source``: random flip,
posterior sample), then forward, backward and AdamW on the model. From images the batch is
decoded from JPEG, ADM-cropped and encoded by a KL-16-layout VAE (random weights; only the cost
matters); from the cache its float32 posterior moments are read from the shards. Also timed: building
the cache (each image encoded twice, as is and flipped).

    .venv/bin/python benchmarks/cache.py                                  # tiny: 64 px, KL-16 at 1/4 width
    .venv/bin/python benchmarks/cache.py --width 128 --image-size 256 --device cuda   # MAR's KL-16 size

Prints a markdown table: images/s of each, and the ratio.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from latentlm.config import CacheLatentsConfig, DataConfig, TokenizerConfig
from latentlm.data import CachedLatents, ImageFolder, collate_skipping_bad, latent_source, write_cache
from latentlm.models import build_model
from latentlm.tokenizers import KL16, KL16Config
from latentlm.training.loop import ShardedBatchSampler
from latentlm.training.model import param_groups


def make_folder(root: Path, count: int, image_size: int, classes: int = 4) -> None:
    """``count`` JPEGs of smooth random colour fields, 1.25 x 1.5 the crop size so the crop resizes."""
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 255, (6, 5, 3), dtype=np.uint8)
        size = (int(image_size * 1.25), int(image_size * 1.5))
        Image.fromarray(small).resize(size, Image.BICUBIC).save(folder / f"{i:05d}.jpg", quality=90)


def time_training(dataset, tokenizer: KL16, image_size: int, batch: int, steps: int, workers: int,
                  device: torch.device) -> list[float]:
    """Seconds per training step (``steps`` steps after two warm-up steps)."""
    c, h, _ = tokenizer.latent_shape(image_size)
    torch.manual_seed(0)
    model = build_model("Transformer-Tiny", in_channels=c, input_size=h, num_classes=4).to(device).train()
    optimizer = torch.optim.AdamW(param_groups(model, 0.1, decay_all=False), lr=1e-4, betas=(0.9, 0.98))
    loader = DataLoader(dataset, batch_sampler=ShardedBatchSampler(len(dataset), batch, 0, 1, seed=0),
                        num_workers=workers, collate_fn=collate_skipping_bad, persistent_workers=workers > 0)
    batches = iter(loader)
    source = latent_source(dataset, tokenizer, hflip=True, sample_posterior=True)
    times = []
    for step in range(steps + 2):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        inputs, labels, _ = next(batches)
        latents = source.latents(inputs, device)
        loss = model(latents, labels.to(device))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= 2:
            times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256, help="images in the generated folder")
    parser.add_argument("--image-size", type=int, default=64, help="crop size (a multiple of 16)")
    parser.add_argument("--width", type=int, default=32, help="KL-16 ch (MAR: 128); ch_mult (1, 1, 2, 2, 4)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--workers", type=int, default=1, help="DataLoader worker processes")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    tokenizer = KL16(KL16Config(ch=args.width)).eval().requires_grad_(False).to(device)
    params = sum(p.numel() for p in tokenizer.parameters())

    with tempfile.TemporaryDirectory() as tmp:
        root, cache = Path(tmp) / "images", Path(tmp) / "cache"
        make_folder(root, args.images, args.image_size)
        cfg = CacheLatentsConfig(out=str(cache), data=DataConfig(path=str(root), image_size=args.image_size,
                                                                 num_workers=args.workers),
                                 tokenizer=TokenizerConfig(norm_images=args.images), batch_size=args.batch,
                                 images_per_shard=args.batch * 4, device=args.device, progress=False)
        t0 = time.perf_counter()
        write_cache(cfg, tokenizer=tokenizer)
        build = time.perf_counter() - t0
        cache_bytes = sum(p.stat().st_size for p in (cache / "shards").iterdir())
        cached = CachedLatents(cache)
        tokenizer.set_normalization(*cached.normalization(sample_posterior=True))
        folder = ImageFolder(root, args.image_size)
        results = {}
        for name, dataset in (("images: JPEG decode + ADM crop + KL-16 encode", folder),
                              ("latent cache (float32 moments)", cached)):
            results[name] = statistics.median(time_training(dataset, tokenizer, args.image_size, args.batch,
                                                            args.steps, args.workers, device))

    threads = torch.get_num_threads()
    print(f"{platform.processor() or platform.machine()}, {threads} torch thread(s), {args.workers} DataLoader "
          f"worker(s), torch {torch.__version__}, device {device}")
    print(f"KL-16 layout ch={args.width} ({params / 1e6:.1f}M params) at {args.image_size} px -> latents "
          f"{tuple(tokenizer.latent_shape(args.image_size))}; model Transformer-Tiny; batch {args.batch}; "
          f"median of {args.steps} steps\n")
    base = next(iter(results.values()))
    print("| training from | s / step | images/s | vs images |")
    print("|---|---|---|---|")
    for name, seconds in results.items():
        print(f"| {name} | {seconds:.3f} | {args.batch / seconds:.1f} | {base / seconds:.2f}x |")
    print(f"\nbuilding the cache: {args.images} images in {build:.1f} s ({args.images / build:.1f} images/s, each "
          f"encoded as is and flipped, plus the normalization pass); {cache_bytes / args.images / 1024:.1f} KiB "
          "per image on disk")


if __name__ == "__main__":
    main()
