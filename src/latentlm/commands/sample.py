"""``latentlm sample``: a labelled grid PNG from a checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path

from latentlm.checkpoint import load_trained
from latentlm.config import ConfigError, SampleConfig
from latentlm.distributed import resolve_device
from latentlm.io import check_writable
from latentlm.visualize import sample_grid

log = logging.getLogger(__name__)


def sample(cfg: SampleConfig) -> Path:
    """Write a labelled grid PNG for ``cfg.classes`` and return its path.

    Raises ``ConfigError`` for a bad option (no checkpoint, unknown class id, sampler that does not
    fit the model's process) before generating anything.
    """
    cfg.validate()
    check_writable(Path(cfg.out).parent, "--out")
    try:
        trained = load_trained(cfg.checkpoint, cfg.ema, cfg.tokenizer_path, resolve_device(cfg.device))
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(str(err)) from err
    num_classes = trained.model.config.num_classes
    bad = [c for c in cfg.classes if not 0 <= c < num_classes]
    if bad:
        raise ConfigError(f"classes {bad} out of range: this model has classes 0..{num_classes - 1}")
    cfg.sampler.validate(trained.model.config)
    log.info("sampling %d x %d images from %s (%s weights)", len(cfg.classes), cfg.per_class,
             trained.checkpoint.path, "EMA" if cfg.ema else "training")
    grid = sample_grid(trained.model, trained.tokenizer, cfg.classes, cfg.per_class, cfg.sampler, cfg.seed,
                       trained.class_names, progress=True)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    log.info("wrote %s", out)
    return out


def run(cfg: SampleConfig) -> int:
    sample(cfg)
    return 0
