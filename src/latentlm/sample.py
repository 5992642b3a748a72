"""Sample grids from a model or a checkpoint (``latentlm sample``).

``generate_grid`` runs ``model.generate`` for a list of classes and decodes with the tokenizer;
``make_grid`` lays images out one row per class with the class name beside each row;
``sample`` is the command: checkpoint in, PNG out.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from latentlm.checkpoint import load_checkpoint, resolve_checkpoint
from latentlm.config import ConfigError, ModelConfig, SampleCommandConfig, SamplerConfig, from_dict
from latentlm.diffusion import build_process, check_sampler
from latentlm.models import model_from_config
from latentlm.tokenizers import Tokenizer, tokenizer_from_record

log = logging.getLogger(__name__)


def check_sampling_options(model_cfg: ModelConfig, sampler: SamplerConfig) -> None:
    """Raise ``ConfigError`` when ``sampler`` cannot run on a model of ``model_cfg`` (checked before any work)."""
    try:
        check_sampler(build_process(model_cfg.process), sampler)
    except ValueError as err:
        raise ConfigError(f"sampler: {err}") from err
    if model_cfg.family == "dit" and sampler.cfg_schedule != "constant":
        raise ConfigError(f"sampler.cfg_schedule={sampler.cfg_schedule!r} follows LatentLM's token order; "
                          "DiT allows only 'constant'")
    if not (math.isfinite(sampler.cfg_scale) and math.isfinite(sampler.temperature) and sampler.temperature > 0):
        raise ConfigError(f"sampler: cfg_scale={sampler.cfg_scale} and temperature={sampler.temperature} must be "
                          "finite, temperature > 0")


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images (N, 3, H, W) in [-1, 1] -> uint8 (N, H, W, 3) on CPU."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def make_grid(images: torch.Tensor, rows: int, row_labels: Sequence[str] | None = None,
              min_cell: int = 64, pad: int = 2) -> Image.Image:
    """A PIL grid of ``images`` (N, 3, H, W) in [-1, 1], ``rows`` rows filled row-major.

    Small images are upscaled by an integer factor (nearest) to at least ``min_cell`` pixels so 8x8
    digits stay visible; ``row_labels`` (one per row) are written in a column on the left.
    """
    n, _, h, w = images.shape
    cols = math.ceil(n / rows)
    zoom = max(1, math.ceil(min_cell / max(h, w)))
    ch, cw = h * zoom, w * zoom
    font = ImageFont.load_default()
    label_w = 0
    if row_labels:
        probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        label_w = max(int(probe.textlength(str(t), font=font)) for t in row_labels) + 3 * pad
    grid = Image.new("RGB", (label_w + cols * (cw + pad) + pad, rows * (ch + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    pixels = to_uint8(images).numpy()  # (N, H, W, 3)
    for k in range(n):
        r, c = divmod(k, cols)
        cell = Image.fromarray(pixels[k]).resize((cw, ch), Image.NEAREST)
        grid.paste(cell, (label_w + pad + c * (cw + pad), pad + r * (ch + pad)))
    for r, text in enumerate(row_labels or []):
        draw.text((pad, pad + r * (ch + pad) + ch // 2), str(text), fill="black", font=font, anchor="lm")
    return grid


@torch.no_grad()
def generate_grid(
    model: nn.Module,
    tokenizer: Tokenizer,
    classes: Sequence[int],
    per_class: int,
    sampler: SamplerConfig,
    seed: int = 0,
    class_names: Sequence[str] | None = None,
    progress: bool = False,
) -> Image.Image:
    """Generate ``per_class`` images for each class id and return the labelled grid.

    Image k (row-major) uses noise seeded by (seed, k), so a grid is reproducible and a row does
    not depend on the other rows. Runs on the model's device; the tokenizer is moved there.
    """
    device = next(model.parameters()).device
    labels = torch.tensor([c for c in classes for _ in range(per_class)], device=device)  # (N,)
    latents = model.generate(labels, sampler=sampler, seed=seed, progress=progress)  # (N, C, h, w) normalized
    images = tokenizer.to(device).decode(latents.float())  # (N, 3, S, S) in [-1, 1]
    rows = [str(c) if not class_names or class_names[c] == str(c) else f"{c}: {class_names[c]}" for c in classes]
    return make_grid(images, rows=len(classes), row_labels=rows)


def load_for_sampling(
    checkpoint: str | Path, ema: bool = True, tokenizer_path: str | None = None, device: str | torch.device = "cpu"
) -> tuple[nn.Module, Tokenizer, list[str], Path]:
    """``(model in eval mode, tokenizer with the run's normalization, class names, checkpoint dir)``.

    ``checkpoint`` is a checkpoint directory or a run directory (its newest complete checkpoint).
    """
    path = resolve_checkpoint(checkpoint)
    ckpt = load_checkpoint(path, weights_only=True)
    model_cfg = from_dict(ModelConfig, ckpt.config["train"]["model"])
    model = model_from_config(model_cfg)
    model.load_state_dict(ckpt.ema if ema else ckpt.model)
    model.to(device).eval()
    tokenizer = tokenizer_from_record(ckpt.tokenizer, path=tokenizer_path).to(device)
    names = ckpt.config.get("class_names") or [str(i) for i in range(model_cfg.num_classes)]
    return model, tokenizer, list(names), path


def sample(cfg: SampleCommandConfig) -> Path:
    """``latentlm sample``: write a labelled grid PNG for ``cfg.classes`` and return its path.

    Raises ``ConfigError`` for a bad option (no checkpoint, unknown class id, sampler that does not
    fit the model's process) before generating anything.
    """
    if cfg.per_class < 1:
        raise ConfigError(f"per_class={cfg.per_class}: must be >= 1")
    if not cfg.classes:
        raise ConfigError("classes is empty: pass --classes with at least one class id")
    if not cfg.out.lower().endswith(".png"):
        raise ConfigError(f"out={cfg.out}: must be a .png path")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    try:
        model, tokenizer, names, path = load_for_sampling(cfg.checkpoint, cfg.ema, cfg.tokenizer_path, device)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(str(err)) from err
    num_classes = model.config.num_classes
    bad = [c for c in cfg.classes if not 0 <= c < num_classes]
    if bad:
        raise ConfigError(f"classes {bad} out of range: this model has classes 0..{num_classes - 1}")
    check_sampling_options(model.config, cfg.sampler)
    log.info("sampling %d x %d images from %s (%s weights)", len(cfg.classes), cfg.per_class, path,
             "EMA" if cfg.ema else "training")
    grid = generate_grid(model, tokenizer, cfg.classes, cfg.per_class, cfg.sampler, cfg.seed, names, progress=True)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    log.info("wrote %s", out)
    return out
