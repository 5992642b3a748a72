"""Peak resident memory of ``sample-many`` does not grow with the number of images N.

Writes a tiny untrained checkpoint (identity tokenizer on 128x128 images, f = 16, so latents
(768, 8, 8) and 64 tokens), then runs ``sample_many`` once per N, each in a fresh process, and
prints N, the process's peak RSS (``ru_maxrss`` from ``wait4``), seconds, and the size of the uint8
output. If generation kept every image in memory, the N = 2000 run would need at least the
output's size more (2000 x 128 x 128 x 3 bytes = 98 MB; 393 MB as float32) than the N = 200 run.

    .venv/bin/python benchmarks/sample_memory.py                    # N = 200 and 2000, DiT-Tiny, CPU
    .venv/bin/python benchmarks/sample_memory.py --counts 200 2000 20000 --model Transformer-Tiny
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from latentlm.checkpoint import begin_checkpoint, checkpoint_dir, mark_complete, write_main_files, write_rng
from latentlm.commands.sample_many import sample_many
from latentlm.config import DataConfig, SampleManyConfig, SamplerConfig, TokenizerConfig, TrainConfig, to_dict
from latentlm.models import build_model
from latentlm.tokenizers import IdentityTokenizer, tokenizer_record

IMAGE_SIZE, PATCH, NUM_CLASSES = 128, 16, 10


def write_checkpoint(root: Path, preset: str) -> Path:
    """A complete checkpoint of an untrained ``preset`` (1 block, width 64) on 128x128 pixel patches."""
    torch.manual_seed(0)
    model = build_model(preset, depth=1, hidden_size=64, num_heads=2, in_channels=3 * PATCH * PATCH,
                        input_size=IMAGE_SIZE // PATCH, num_classes=NUM_CLASSES)
    tokenizer = IdentityTokenizer(PATCH)
    train_cfg = TrainConfig(output_dir=str(root), model=model.config, data=DataConfig(image_size=IMAGE_SIZE),
                            tokenizer=TokenizerConfig(kind="identity", patch=PATCH))
    path = checkpoint_dir(root, 0)
    begin_checkpoint(path)
    state = model.state_dict()
    write_main_files(path, model=state, ema=state, config={"train": to_dict(train_cfg)},
                     tokenizer=tokenizer_record(tokenizer, None), state={"step": 0}, optimizer={}, schedule={})
    write_rng(path, 0)
    mark_complete(path, 0, 1)
    return path


def child(checkpoint: str, out: str, count: int, images_per_shard: int) -> None:
    """Run in a fresh process: generate ``count`` random-class images."""
    sample_many(SampleManyConfig(checkpoint=checkpoint, out=out, num_images=count,
                                   images_per_shard=images_per_shard, batch_size=50,
                                   sampler=SamplerConfig(num_steps=4, cfg_scale=2.0), device="cpu", progress=False))


def measure(checkpoint: Path, out: Path, count: int, images_per_shard: int) -> tuple[float, float]:
    """``(peak RSS in MB, seconds)`` of one ``child`` process."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--child", str(checkpoint), str(out), str(count),
                             str(images_per_shard)], env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"sample-many for N={count} failed with status {status}")
    return usage.ru_maxrss / 1024, seconds  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[200, 2000])
    parser.add_argument("--model", default="DiT-Tiny")
    parser.add_argument("--images-per-shard", type=int, default=100)
    args = parser.parse_args()

    print(f"# {platform.node()} · {platform.processor() or platform.machine()} · {os.cpu_count()} CPUs · "
          f"torch {torch.__version__} · 1 thread · {args.model} · {IMAGE_SIZE}x{IMAGE_SIZE} images · "
          f"{args.images_per_shard} images per shard · {time.strftime('%Y-%m-%d')}")
    print("| N | peak RSS (MB) | seconds | output arr_0 (MB) |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = write_checkpoint(Path(tmp) / "run", args.model)
        for count in args.counts:
            out = Path(tmp) / f"samples-{count}.npz"
            rss, seconds = measure(checkpoint, out, count, args.images_per_shard)
            output_mb = count * IMAGE_SIZE * IMAGE_SIZE * 3 / 2**20
            print(f"| {count} | {rss:.0f} | {seconds:.1f} | {output_mb:.0f} |", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    else:
        main()
