"""What the sha256 of the ``COMPLETE`` marker costs: writing a checkpoint, and reading it back.

A checkpoint of ``--params`` fp32 parameters (model, EMA and an AdamW state of twice their size, as a
training run writes) is written with ``write_main_files``; then timed: ``mark_complete`` (hashes every
file), opening it and loading the EMA weights as ``sample`` does (hashes that file), and ``verify`` (every
file, as a resume does), each with ``LATENTLM_VERIFY=hash`` (the default) and ``size``.

    .venv/bin/python benchmarks/checkpoint_hashing.py                    # 50M parameters: ~1 GB on disk
    .venv/bin/python benchmarks/checkpoint_hashing.py --params 479e6     # LatentLM-L: ~7.7 GB

Prints a markdown table of seconds (best of ``--repeats``; files are in the page cache after the first).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from latentlm.checkpoint import VERIFY_ENV, Checkpoint, begin_checkpoint, mark_complete, write_main_files, write_rng


def best_of(repeats: int, run: Callable[[], object]) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=50e6, help="fp32 parameters of the model")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    n = int(args.params)
    weights = {"w": torch.randn(n)}
    moments = {"exp_avg": torch.randn(n), "exp_avg_sq": torch.rand(n)}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "checkpoints" / "step-00000001"
        begin_checkpoint(path)
        write_main_files(path, model=weights, ema=weights, config={}, tokenizer={}, state={"step": 1},
                         optimizer={"state": {0: moments}},
                         schedule={})
        write_rng(path, 0)
        size = sum(f.stat().st_size for f in path.iterdir()) / 1e9
        rows = [("mark_complete (sha256 of every file)", best_of(args.repeats, lambda: mark_complete(path, 1, 1)))]
        for mode in ("hash", "size"):
            os.environ[VERIFY_ENV] = mode
            rows.append((f"open + EMA weights ({mode})", best_of(args.repeats, lambda: Checkpoint(path).ema)))
            rows.append((f"verify every file ({mode})", best_of(args.repeats, lambda: Checkpoint(path).verify())))
    print(f"checkpoint of {n / 1e6:.0f}M fp32 parameters: {size:.2f} GB on disk, torch {torch.__version__}\n")
    print("| step | seconds |\n|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.2f} |")


if __name__ == "__main__":
    main()
