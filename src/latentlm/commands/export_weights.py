"""``latentlm export-weights``: a checkpoint's weights and EMA, consolidated, as a run directory for sampling.

An FSDP run's checkpoints hold the weights sharded (``sharded/``, one file per process); sampling reads
them as they are, but other tools want plain files. This writes ``<out>/checkpoints/step-<N>/`` with
``model.safetensors`` and ``ema.safetensors`` (fp32, whole) beside the run's ``config.json``,
``tokenizer.json`` and ``state.json`` and a ``COMPLETE`` marker, in one process (no launcher needed).
The optimizer state is not exported: a run resumes from its own checkpoints (on any world size, see
``training/sharding.py``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from latentlm import checkpoint as ckpt_io
from latentlm.config import ConfigError, ExportWeightsConfig

log = logging.getLogger(__name__)


def export_weights(cfg: ExportWeightsConfig) -> Path:
    """Write the export; returns its checkpoint directory. ``ConfigError`` for a missing or incomplete
    checkpoint, or an ``out`` that already holds checkpoints."""
    cfg.validate()
    try:
        saved = ckpt_io.Checkpoint(ckpt_io.resolve_checkpoint(cfg.checkpoint))
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"checkpoint={cfg.checkpoint}: {err}") from err
    if ckpt_io.list_checkpoints(cfg.out):
        raise ConfigError(f"out={cfg.out} already holds checkpoints; choose an empty or new directory")
    path = ckpt_io.checkpoint_dir(cfg.out, saved.step)
    ckpt_io.begin_checkpoint(path)
    ckpt_io.write_main_files(path, model=saved.model, ema=saved.ema, config=saved.config, tokenizer=saved.tokenizer,
                             state=saved.state, optimizer=None, schedule=None)
    ckpt_io.mark_complete(path, saved.step, world_size=1, required=ckpt_io.WEIGHTS_FILES)
    return path


def run(cfg: ExportWeightsConfig) -> None:
    path = export_weights(cfg)
    log.info("exported the weights and EMA of step %d to %s", int(path.name.split("-")[-1]), path)
    print(path)
