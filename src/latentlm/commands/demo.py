"""``latentlm demo`` (``make demo``): the whole pipeline on the bundled digits, no downloads, on a CPU.

Phases, each with its own progress bar:

1. train a σ-VAE on the 16x16 digits (``train_tokenizer``);
2. train a small digit classifier on the real training digits (the metric);
3. train a tiny LatentLM on the σ-VAE latents (``train``), then sample and score it;
4. train a tiny DiT the same way for the same number of steps, then sample and score it;
5. print a table and write ``metrics.json``.

Scores (``latentlm.metrics.digits``): class accuracy of generated images w.r.t. the class requested,
and the Fréchet distance to the real test digits in the classifier's feature space beside its
floor (real training digits with the same labels, same count).

Run directory (default ``runs/demo-<timestamp>``)::

    metrics.json              scores, settings and phase timings
    latentlm_grid.png         10x10 samples, one row per class (also dit_grid.png)
    sigma_vae/recon.png       test digits over their reconstructions; sigma_vae/loss.png
    sigma_vae/tokenizer.safetensors
    latentlm/loss.png, dit/loss.png, and each model's checkpoints/ (``latentlm sample`` reads them)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from latentlm.config import DataConfig, DemoConfig, TokenizerConfig, TokenizerTrainConfig, TrainConfig, to_dict
from latentlm.data.digits import DigitsDataset
from latentlm.metrics.digits import DigitsEvaluator
from latentlm.models import get_config
from latentlm.training.model import train
from latentlm.training.tokenizer import TokenizerTrainResult, train_tokenizer
from latentlm.visualize import make_grid

log = logging.getLogger(__name__)


@dataclass
class DemoResult:
    """What ``demo`` returns (``metrics`` is what ``metrics.json`` holds)."""

    run_dir: Path
    metrics: dict[str, Any]
    table: str


class _ConsoleWarnings(logging.Handler):
    """Warnings and errors of the package, written above the progress bars."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stderr)


@contextlib.contextmanager
def _quiet_console() -> Iterator[None]:
    """Per-step INFO lines go to each phase's train.log only; the console keeps bars and warnings.

    The package logger stops propagating to the root logger's console handlers for the duration
    (the trainers' file handlers sit on the package logger, so they still get everything).
    """
    package_log = logging.getLogger("latentlm")
    console = _ConsoleWarnings(logging.WARNING)
    console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    propagate = package_log.propagate
    package_log.addHandler(console)
    package_log.propagate = False
    try:
        yield
    finally:
        package_log.removeHandler(console)
        package_log.propagate = propagate


def _train_config(cfg: DemoConfig, preset: str, run_dir: Path, tokenizer_path: Path) -> TrainConfig:
    model = get_config(preset)
    if model.family == "latentlm":
        model = dataclasses.replace(model, batch_mul=cfg.latentlm_batch_mul)
    return TrainConfig(
        output_dir=str(run_dir), model=model,
        data=DataConfig(kind="digits", image_size=cfg.image_size, hflip=False, num_workers=0),
        tokenizer=TokenizerConfig(kind="sigma_vae", path=str(tokenizer_path), norm_images=0),  # stats in the file
        max_steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, warmup_steps=min(100, cfg.steps // 10 + 1),
        weight_decay=0.0, ema_decay=cfg.ema_decay, mixed_precision="no", seed=cfg.seed,
        checkpoint_every=cfg.steps, sample_every=0, log_every=100, tensorboard=False, progress=cfg.progress,
    )


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """The closing table: one row per model. ``floor`` is the real-train-vs-real-test Fréchet distance."""
    header = f"{'model':<28}{'class acc':>10}{'Fréchet':>10}{'floor':>8}{'ratio':>8}{'train s':>9}{'sample s':>10}"
    lines = [header, "-" * len(header)]
    for name, r in rows.items():
        lines.append(f"{name:<28}{r['accuracy']:>10.1%}{r['frechet']:>10.2f}{r['frechet_floor']:>8.2f}"
                     f"{r['frechet_ratio']:>8.2f}{r['train_seconds']:>9.0f}{r['sample_seconds']:>10.1f}")
    return "\n".join(lines)


def demo(cfg: DemoConfig) -> DemoResult:
    """Run the demo; returns the run directory, the metrics and the printed table."""
    cfg.validate()
    threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        return _demo(cfg)
    finally:
        torch.set_num_threads(threads)


def _train_vae(cfg: DemoConfig, run_dir: Path) -> TokenizerTrainResult:
    print(f"[1/4] σ-VAE: {cfg.vae_steps} steps on the digits ({cfg.image_size}x{cfg.image_size})", flush=True)
    return train_tokenizer(TokenizerTrainConfig(
        output_dir=str(run_dir / "sigma_vae"), vae=cfg.vae,
        data=DataConfig(kind="digits", image_size=cfg.image_size, hflip=False, num_workers=0),
        max_steps=cfg.vae_steps, seed=cfg.seed, checkpoint_every=cfg.vae_steps, keep_last=1, progress=cfg.progress,
    ))


def _train_and_score(cfg: DemoConfig, key: str, preset: str, phase: int, run_dir: Path, vae: TokenizerTrainResult,
                     evaluator: DigitsEvaluator, labels: torch.Tensor, grid_index: torch.Tensor) -> dict[str, float]:
    """Train one generator on the σ-VAE latents, sample ``labels``, write its grid, score the samples."""
    print(f"[{phase}/4] {preset}: {cfg.steps} steps on σ-VAE latents, then {len(labels)} samples "
          f"(CFG {cfg.sampler.cfg_scale}, {cfg.sampler.num_steps} solver steps)", flush=True)
    t = time.perf_counter()
    result = train(_train_config(cfg, preset, run_dir / key, vae.tokenizer_path.resolve()))
    train_seconds = time.perf_counter() - t
    t = time.perf_counter()
    model = result.ema.eval()
    device = next(model.parameters()).device
    latents = model.generate(labels.to(device), sampler=cfg.sampler, seed=cfg.seed, progress=cfg.progress)
    with torch.no_grad():
        images = vae.tokenizer.to(device).decode(latents.float()).cpu()  # (N, 3, S, S) in [-1, 1]
    sample_seconds = time.perf_counter() - t
    make_grid(images[grid_index.flatten()], rows=10, row_labels=[str(c) for c in range(10)]).save(
        run_dir / f"{key}_grid.png")
    score = evaluator.score(images, labels)
    return {**score.as_dict(), "train_seconds": train_seconds, "sample_seconds": sample_seconds,
            "final_loss": result.losses[-1]}


def _demo(cfg: DemoConfig) -> DemoResult:
    # Setup ---------------------------------------------------------------------------------------
    run_dir = Path(cfg.output_dir or f"runs/demo-{datetime.now():%Y%m%d-%H%M%S}")
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"latentlm demo: run directory {run_dir}", flush=True)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    per_class = max(cfg.eval_per_class, 10)
    labels = torch.arange(10).repeat_interleave(per_class)  # (10 per_class,), class-major
    grid_index = torch.arange(10)[:, None] * per_class + torch.arange(10)  # (10, 10): first 10 of each class

    with _quiet_console():
        # 1. σ-VAE ------------------------------------------------------------------------------------
        t = time.perf_counter()
        vae = _train_vae(cfg, run_dir)
        timings["sigma_vae"] = time.perf_counter() - t

        # 2. Classifier (the metric) ---------------------------------------------------------------------
        print("[2/4] digit classifier on the real training digits", flush=True)
        t = time.perf_counter()
        train_set = DigitsDataset("train", image_size=cfg.image_size)
        test_set = DigitsDataset("test", image_size=cfg.image_size)
        evaluator = DigitsEvaluator.fit(train_set.images, train_set.labels, test_set.images, seed=cfg.seed,
                                        epochs=cfg.classifier_epochs, progress=cfg.progress)
        real_accuracy = evaluator.score(test_set.images, test_set.labels).accuracy
        real_floor = evaluator.floor(train_set.labels)  # all training digits vs all test digits
        timings["classifier"] = time.perf_counter() - t

        # 3-4. LatentLM and DiT on the same latents --------------------------------------------------------
        rows: dict[str, dict[str, float]] = {}
        for phase, (key, preset) in enumerate((("latentlm", cfg.latentlm_model), ("dit", cfg.dit_model)), start=3):
            row = _train_and_score(cfg, key, preset, phase, run_dir, vae, evaluator, labels, grid_index)
            rows[f"{key} ({preset})"] = row
            timings[key] = row["train_seconds"] + row["sample_seconds"]
    timings["total"] = time.perf_counter() - start

    # Report ------------------------------------------------------------------------------------------
    table = format_table(rows)
    metrics = {
        "models": rows,
        "classifier": {"test_accuracy": real_accuracy, "frechet_train_vs_test": real_floor,
                       "num_train": len(train_set), "num_test": len(test_set)},
        "sigma_vae": {"tokenizer": str(vae.tokenizer_path), "final_loss": vae.losses[-1],
                      **vae.tokenizer.normalization()},
        "timings_seconds": timings,
        "config": to_dict(cfg),
        "torch_threads": torch.get_num_threads(),  # what the timings ran with
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print("\n" + table)
    print(f"\nclassifier on the real test digits: {real_accuracy:.1%} accuracy. floor: Fréchet distance of "
          f"{len(labels)} real training digits to the test digits (all {len(train_set)}: {real_floor:.2f})")
    print(f"grids: {run_dir / 'latentlm_grid.png'}  {run_dir / 'dit_grid.png'}")
    print(f"reconstructions: {run_dir / 'sigma_vae' / 'recon.png'}; loss curves: */loss.png")
    print(f"metrics: {run_dir / 'metrics.json'}   total {timings['total']:.0f} s")
    return DemoResult(run_dir=run_dir, metrics=metrics, table=table)


def run(cfg: DemoConfig) -> int:
    demo(cfg)
    return 0
