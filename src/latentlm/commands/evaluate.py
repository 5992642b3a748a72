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
from latentlm.io import file_sha256, write_json
from latentlm.metrics.digits import digits_metrics
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


def _checkpoint_data_kind(checkpoint: str) -> str | None:
    try:
        ckpt = Checkpoint(resolve_checkpoint(checkpoint))
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(str(err)) from err
    return ckpt.train_config.get("data", {}).get("kind")


def evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    """``latentlm evaluate``: generate ``cfg.out`` if a checkpoint is given (resumable, all processes),
    then score it on the first process and write ``cfg.results``. Returns the results (``{}`` on other
    processes). Raises ``ConfigError`` for bad options before generating anything."""
    # Setup: every option is checked before minutes of generation -------------------------------------
    samples = Path(cfg.out)
    if cfg.eval_images is not None and cfg.eval_images < 2:
        raise ConfigError(f"eval_images={cfg.eval_images}: need at least 2 images")
    record = existing_record(samples)
    data_kind = _checkpoint_data_kind(cfg.checkpoint) if cfg.checkpoint else (
        record["settings"].get("data_kind") if record else None)
    digits = data_kind == "digits"
    if cfg.reference is None and not digits:
        raise ConfigError("--reference is required: an ADM reference batch (VIRTUAL_imagenet256_labeled.npz), a "
                          "mu/sigma .npz, or a file from `latentlm reference-stats` (only checkpoints trained on the "
                          "bundled digits can be scored without one)")
    if not cfg.checkpoint and not samples.is_file():
        raise ConfigError(f"samples {samples} do not exist: pass --checkpoint to generate them, or --out an "
                          "existing .npz")
    reference = load_reference(cfg.reference) if cfg.reference else None
    weights = resolve_inception_weights(cfg.inception_weights) if reference else None

    # Samples --------------------------------------------------------------------------------------------
    if cfg.checkpoint:
        sample_many(cfg)
        if not Distributed.start(cfg.device).is_main:
            return {}
        record = existing_record(samples)
    available, height, width = check_image_npz(samples)
    num_images = available if cfg.eval_images is None else cfg.eval_images
    if num_images > available:
        raise ConfigError(f"{samples} holds {available} images but {num_images} were requested (--eval-images); "
                          "generate more (sample-many --per-class/--num-images) or lower --eval-images")
    if num_images < 2:
        raise ConfigError(f"{samples} holds {available} image(s): need at least 2")

    # Metrics ---------------------------------------------------------------------------------------------
    metrics: dict[str, Any] = {}
    if reference is not None:
        inception = InceptionFeatures(weights, resolve_device(cfg.device))
        metrics.update(inception_metrics(samples, num_images, reference, inception, cfg.inception_batch_size,
                                         cfg.isc_splits, cfg.prc_neighborhood, cfg.progress))
    if digits:
        metrics["digits"] = digits_metrics(samples, num_images, height, seed=0)

    # Report ------------------------------------------------------------------------------------------------
    import torch_fidelity

    results = {
        "metrics": metrics,
        "samples": {"path": str(samples.resolve()), "num_images": num_images, "available": available,
                    "image_size": [height, width]},
        "generation": record["settings"] if record else None,  # checkpoint, sampler, steps, CFG, EMA, seed, N
        "reference": reference.describe() if reference else None,
        "inception": {"path": str(weights.resolve()), "sha256": file_sha256(weights),
                      "official": file_sha256(weights).startswith(INCEPTION_SHA256_PREFIX)} if weights else None,
        "settings": {"isc_splits": cfg.isc_splits, "isc_shuffle_seed": 2020, "prc_neighborhood": cfg.prc_neighborhood,
                     "inception_batch_size": cfg.inception_batch_size,
                     "sfid_features": "mixed_6/conv (Mixed_6d.branch1x1) channels 0..6, NHWC-flattened"},
        "versions": {"latentlm": latentlm.__version__, "torch": torch.__version__,
                     "torch_fidelity": torch_fidelity.__version__},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if results["inception"] and not results["inception"]["official"]:
        log.warning("Inception weights %s are not torch-fidelity's %s: scores are not comparable to published ones",
                    weights, INCEPTION_FILE)
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
