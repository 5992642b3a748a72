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

from latentlm.commands.sweep import SweepPoint
from latentlm.config import (
    DataConfig,
    DemoConfig,
    ModelConfig,
    TokenizerConfig,
    TokenizerTrainConfig,
    TrainConfig,
    from_dict,
    to_dict,
)
from latentlm.data.digits import DigitsDataset
from latentlm.flops import training_flops
from latentlm.metrics.digits import DigitsEvaluator
from latentlm.models import get_config
from latentlm.training.model import train
from latentlm.training.tokenizer import TokenizerTrainResult, train_tokenizer
from latentlm.visualize import make_grid, save_sweep_plot

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


def _train_config(cfg: DemoConfig, preset: str, steps: int, run_dir: Path, tokenizer_path: Path) -> TrainConfig:
    model = get_config(preset)
    if model.family == "latentlm":
        model = dataclasses.replace(model, batch_mul=cfg.latentlm_batch_mul)
    return TrainConfig(
        output_dir=str(run_dir), model=model,
        data=DataConfig(kind="digits", image_size=cfg.image_size, hflip=False, num_workers=0),
        tokenizer=TokenizerConfig(kind="sigma_vae", path=str(tokenizer_path), norm_images=0),  # stats in the file
        max_steps=steps, batch_size=cfg.batch_size, lr=cfg.lr, warmup_steps=min(100, steps // 10 + 1),
        weight_decay=0.0, ema_decay=cfg.ema_decay, mixed_precision="no", seed=cfg.seed,
        checkpoint_every=steps, sample_every=0, log_every=100, tensorboard=False, progress=cfg.progress,
    )


def format_table(rows: dict[str, dict[str, Any]]) -> str:
    """The closing table: each model at the fixed guidance scale and at its best one (``floor`` is the
    real-train-vs-real-test Fréchet distance; GFLOP: training compute)."""
    header = (f"{'model':<28}{'CFG':>10}{'class acc':>10}{'Fréchet':>10}{'floor':>8}{'ratio':>8}{'train s':>9}"
              f"{'GFLOP':>9}{'sample s':>10}")
    lines = [header, "-" * len(header)]
    for name, r in rows.items():
        for label, point in (("fixed", r["fixed"]), ("best", r["best"])):
            lines.append(f"{name:<28}{label + ' ' + format(point['cfg_scale'], 'g'):>10}{point['accuracy']:>10.1%}"
                         f"{point['frechet']:>10.2f}{point['frechet_floor']:>8.2f}{point['frechet_ratio']:>8.2f}"
                         f"{r['train_seconds']:>9.0f}{r['train_flops'] / 1e9:>9.0f}{point['sample_seconds']:>10.1f}")
    return "\n".join(lines)


def best_scale(points: list[dict[str, Any]], min_accuracy: float) -> dict[str, Any]:
    """The point with the lowest Fréchet ratio among those with at least ``min_accuracy`` (all when none has)."""
    eligible = [p for p in points if p["accuracy"] >= min_accuracy] or points
    return min(eligible, key=lambda p: p["frechet_ratio"])


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


@torch.no_grad()
def _guidance_sweep(cfg: DemoConfig, model: torch.nn.Module, vae: TokenizerTrainResult, evaluator: DigitsEvaluator,
                    labels: torch.Tensor) -> tuple[list[dict[str, Any]], dict[float, torch.Tensor]]:
    """Samples for ``labels`` at every scale of ``cfg.cfg_scales`` (and the fixed one), scored:
    ``(points, images by scale)``; a point holds the scale, the scores and the seconds its samples took."""
    device = next(model.parameters()).device
    points, images = [], {}
    for scale in dict.fromkeys((*cfg.cfg_scales, cfg.sampler.cfg_scale)):
        t = time.perf_counter()
        sampler = dataclasses.replace(cfg.sampler, cfg_scale=scale)
        latents = model.generate(labels.to(device), sampler=sampler, seed=cfg.seed)
        images[scale] = vae.tokenizer.to(device).decode(latents.float()).cpu()  # (N, 3, S, S) in [-1, 1]
        score = evaluator.score(images[scale], labels)
        points.append({"cfg_scale": scale, **score.as_dict(), "sample_seconds": time.perf_counter() - t})
    return points, images


def _train_and_score(cfg: DemoConfig, key: str, preset: str, steps: int, phase: str, run_dir: Path,
                     vae: TokenizerTrainResult, evaluator: DigitsEvaluator, labels: torch.Tensor,
                     grid_index: torch.Tensor) -> dict[str, Any]:
    """Train one generator on the σ-VAE latents, sweep the guidance scale, write its grid at the best scale."""
    print(f"[{phase}] {preset}: {steps} steps on σ-VAE latents, then {len(labels)} samples at each CFG scale "
          f"{', '.join(f'{s:g}' for s in cfg.cfg_scales)} ({cfg.sampler.num_steps} solver steps)", flush=True)
    t = time.perf_counter()
    result = train(_train_config(cfg, preset, steps, run_dir / key, vae.tokenizer_path.resolve()))
    train_seconds = time.perf_counter() - t
    points, images = _guidance_sweep(cfg, result.ema.eval(), vae, evaluator, labels)
    best = best_scale([p for p in points if p["cfg_scale"] in cfg.cfg_scales], cfg.min_accuracy)
    make_grid(images[best["cfg_scale"]][grid_index.flatten()], rows=10, row_labels=[str(c) for c in range(10)]
              ).save(run_dir / f"{key}_grid.png")
    fixed = next(p for p in points if p["cfg_scale"] == cfg.sampler.cfg_scale)
    return {"steps": steps, "train_flops": result.train_flops,
            "train_seconds": train_seconds, "final_loss": result.losses[-1], "sweep": points, "fixed": fixed,
            "best": best, "model_config": to_dict(result.model.config)}


def _dit_steps(cfg: DemoConfig, latentlm: dict[str, Any]) -> int:
    """DiT's steps: ``cfg.dit_steps``, else as many as give it LatentLM's training FLOPs."""
    if cfg.dit_steps is not None:
        return cfg.dit_steps
    model = from_dict(ModelConfig, latentlm["model_config"])
    dit = get_config(cfg.dit_model, in_channels=model.in_channels, input_size=model.input_size,
                     num_classes=model.num_classes)
    return max(1, round(latentlm["train_flops"] / training_flops(dit, cfg.batch_size)))


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

        # 3-4. LatentLM, then DiT at the same training FLOPs, on the same latents ------------------------
        rows: dict[str, dict[str, Any]] = {}
        common = (run_dir, vae, evaluator, labels, grid_index)
        t = time.perf_counter()
        latentlm = _train_and_score(cfg, "latentlm", cfg.latentlm_model, cfg.steps, "3/4", *common)
        rows[f"latentlm ({cfg.latentlm_model})"], timings["latentlm"] = latentlm, time.perf_counter() - t
        t = time.perf_counter()
        dit = _train_and_score(cfg, "dit", cfg.dit_model, _dit_steps(cfg, latentlm), "4/4", *common)
        rows[f"dit ({cfg.dit_model})"], timings["dit"] = dit, time.perf_counter() - t
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
    save_sweep_plot([SweepPoint(name, "", dataclasses.replace(cfg.sampler, cfg_scale=p["cfg_scale"]), "",
                                {"digits_frechet_ratio": p["frechet_ratio"], "digits_accuracy": p["accuracy"]})
                     for name, row in rows.items() for p in row["sweep"] if p["cfg_scale"] in cfg.cfg_scales],
                    run_dir / "guidance.png", "digits_frechet_ratio", "digits_accuracy")
    print(f"grids (at the best scale): {run_dir / 'latentlm_grid.png'}  {run_dir / 'dit_grid.png'}; "
          f"guidance sweep: {run_dir / 'guidance.png'}")
    print(f"reconstructions: {run_dir / 'sigma_vae' / 'recon.png'}; loss curves: */loss.png")
    print(f"metrics: {run_dir / 'metrics.json'}   total {timings['total']:.0f} s")
    return DemoResult(run_dir=run_dir, metrics=metrics, table=table)


def run(cfg: DemoConfig) -> int:
    demo(cfg)
    return 0
