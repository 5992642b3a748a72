"""``latentlm evaluate``: FID / IS / sFID / precision-recall (and the digits metrics) of a sample file,
generating it first (``sample-many``) when a checkpoint is given; results go to a JSON with every
setting that produced them."""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

import latentlm
from latentlm.checkpoint import Checkpoint, resolve_checkpoint
from latentlm.commands.sample_many import existing_record, sample_many
from latentlm.config import ConfigError, EvaluateConfig
from latentlm.distributed import Distributed, resolve_device
from latentlm.io import check_writable, file_sha256, write_json
from latentlm.metrics.digits import DigitsEvaluator, digits_evaluator, digits_metrics
from latentlm.metrics.inception import (
    INCEPTION_FILE,
    INCEPTION_SHA256_PREFIX,
    InceptionFeatures,
    check_image_npz,
    inception_metrics,
    load_reference,
    resolve_inception_weights,
)

log = logging.getLogger(__name__)


def _checkpoint_data_kind(checkpoint: str, ema: bool) -> str | None:
    """The data kind the checkpoint was trained on; its weights file is checked first (before any scorer)."""
    try:
        ckpt = Checkpoint(resolve_checkpoint(checkpoint))
        ckpt.verify_file("ema.safetensors" if ema else "model.safetensors")
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(str(err)) from err
    return ckpt.train_config.get("data", {}).get("kind")


class Scorer:
    """Scores sample files with the metrics that apply: Inception metrics against ``reference`` when one is
    given, the digit classifier's when ``digits``. Built once, it keeps the Inception network and the
    fitted digit classifiers (per image size) for every file it scores (``latentlm sweep`` scores many)."""

    def __init__(self, cfg: EvaluateConfig, digits: bool) -> None:
        self.cfg, self.digits = cfg, digits
        self.reference = load_reference(cfg.reference) if cfg.reference else None
        self.weights = resolve_inception_weights(cfg.inception_weights) if self.reference else None
        self._inception: InceptionFeatures | None = None
        self._digits: dict[int, DigitsEvaluator] = {}

    def score(self, samples: Path, num_images: int, image_size: int) -> dict[str, Any]:
        """The metrics of the first ``num_images`` images of ``samples`` (an ADM ``.npz``)."""
        cfg, metrics = self.cfg, {}
        if self.reference is not None:
            if self._inception is None:
                self._inception = InceptionFeatures(self.weights, resolve_device(cfg.device))
            metrics.update(inception_metrics(samples, num_images, self.reference, self._inception,
                                             cfg.inception_batch_size, cfg.isc_splits, cfg.prc_neighborhood,
                                             cfg.progress))
        if self.digits:
            if image_size not in self._digits:
                self._digits[image_size] = digits_evaluator(image_size, seed=0)
            metrics["digits"] = digits_metrics(samples, num_images, self._digits[image_size])
        return metrics

    def describe(self) -> dict[str, Any]:
        """What produced the scores: reference, Inception weights, metric settings, versions."""
        import torch_fidelity

        cfg, weights = self.cfg, self.weights
        return {
            "reference": self.reference.describe() if self.reference else None,
            "inception": {"path": str(weights.resolve()), "sha256": file_sha256(weights),
                          "official": file_sha256(weights).startswith(INCEPTION_SHA256_PREFIX)} if weights else None,
            "settings": {"isc_splits": cfg.isc_splits, "isc_shuffle_seed": 2020,
                         "prc_neighborhood": cfg.prc_neighborhood, "inception_batch_size": cfg.inception_batch_size,
                         "sfid_features": "mixed_6/conv (Mixed_6d.branch1x1) channels 0..6, NHWC-flattened"},
            "versions": {"latentlm": latentlm.__version__, "torch": torch.__version__,
                         "torch_fidelity": torch_fidelity.__version__},
        }


def check_scoring(cfg: EvaluateConfig, data_kind: str | None) -> bool:
    """Whether the digits metrics apply (a checkpoint trained on the bundled digits); ``ConfigError`` when
    nothing can score the samples (no reference for an ImageNet-like checkpoint)."""
    digits = data_kind == "digits"
    if cfg.reference is None and not digits:
        raise ConfigError("--reference is required: an ADM reference batch (VIRTUAL_imagenet256_labeled.npz), a "
                          "mu/sigma .npz, or a file from `latentlm reference-stats` (only checkpoints trained on the "
                          "bundled digits can be scored without one)")
    return digits


def images_to_score(samples: Path, eval_images: int | None) -> tuple[int, int, int]:
    """``(images to score, available, image side)`` of a sample file; ``ConfigError`` when too few."""
    available, height, _ = check_image_npz(samples)
    num_images = available if eval_images is None else eval_images
    if num_images > available:
        raise ConfigError(f"{samples} holds {available} images but {num_images} were requested (--eval-images); "
                          "generate more (sample-many --per-class/--num-images) or lower --eval-images")
    if num_images < 2:
        raise ConfigError(f"{samples} holds {available} image(s): need at least 2")
    return num_images, available, height


def evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    """``latentlm evaluate``: generate ``cfg.out`` if a checkpoint is given (resumable, all processes),
    then score it on the first process and write ``cfg.results``. Returns the results (``{}`` on other
    processes). Raises ``ConfigError`` for bad options before generating anything."""
    # Setup: every option is checked before minutes of generation -------------------------------------
    samples = Path(cfg.out)
    if cfg.eval_images is not None and cfg.eval_images < 2:
        raise ConfigError(f"eval_images={cfg.eval_images}: need at least 2 images")
    record = existing_record(samples)
    data_kind = _checkpoint_data_kind(cfg.checkpoint, cfg.ema) if cfg.checkpoint else (
        record["settings"].get("data_kind") if record else None)
    digits = check_scoring(cfg, data_kind)
    if not cfg.checkpoint and not samples.is_file():
        raise ConfigError(f"samples {samples} do not exist: pass --checkpoint to generate them, or --out an "
                          "existing .npz")
    check_writable(Path(cfg.results).parent if cfg.results else samples.parent, "--results")
    scorer = Scorer(cfg, digits)

    # Samples, metrics ---------------------------------------------------------------------------------------
    if cfg.checkpoint:
        sample_many(cfg)
        if not Distributed.start(cfg.device).is_main:
            return {}
        record = existing_record(samples)
    num_images, available, side = images_to_score(samples, cfg.eval_images)
    metrics = scorer.score(samples, num_images, side)

    # Report ------------------------------------------------------------------------------------------------
    results = {
        "metrics": metrics,
        "samples": {"path": str(samples.resolve()), "num_images": num_images, "available": available,
                    "image_size": [side, side]},
        "generation": record["settings"] if record else None,  # checkpoint, sampler, steps, CFG, EMA, seed, N
        **scorer.describe(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if results["inception"] and not results["inception"]["official"]:
        log.warning("Inception weights %s are not torch-fidelity's %s: scores are not comparable to published ones",
                    scorer.weights, INCEPTION_FILE)
    out = Path(cfg.results) if cfg.results else samples.with_suffix(".eval.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, results)
    print(format_metrics(metrics, num_images))
    print(f"results: {out}")
    return results


def format_metrics(metrics: dict[str, Any], num_images: int) -> str:
    """One line per metric, ``-`` for those the reference did not allow."""
    lines = [f"images scored: {num_images}"]
    for key, label in (("fid", "FID"), ("sfid", "sFID"), ("inception_score", "IS"), ("precision", "precision"),
                       ("recall", "recall")):
        if key in metrics:
            value = metrics[key]
            extra = f" ± {metrics['inception_score_std']:.2f}" if key == "inception_score" else ""
            lines.append(f"{label:>10}: " + ("-" if value is None else f"{value:.4f}{extra}"))
    for key, value in metrics.get("digits", {}).items():
        lines.append(f"{'digits ' + key:>21}: " + (f"{value}" if key == "num_images" else f"{value:.4f}"))
    return "\n".join(lines)


def run(cfg: EvaluateConfig) -> int:
    evaluate(cfg)
    return 0
