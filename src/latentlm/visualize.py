"""Pictures: labelled sample grids and loss curves (PNG).

``make_grid`` lays images out one row per class with the class name beside each row; ``sample_grid``
generates such a grid from a model and its tokenizer; ``save_loss_curve`` plots a training run's loss.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from latentlm.config import SamplerConfig
from latentlm.tokenizers import Tokenizer


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
def sample_grid(
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


def save_loss_curve(losses: list[float], path: Path) -> None:
    """PNG of the per-step loss and its moving average (non-finite steps left out)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps = [i + 1 for i, v in enumerate(losses) if math.isfinite(v)]
    values = [v for v in losses if math.isfinite(v)]
    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(steps, values, lw=0.6, alpha=0.4, label="loss")
    window = max(1, len(values) // 50)
    if len(values) >= 2 * window > 2:
        smooth = torch.tensor(values).unfold(0, window, 1).mean(1).tolist()
        ax.plot(steps[window - 1:], smooth, lw=1.5, label=f"mean of {window}")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log" if values and min(values) > 0 else "linear")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def save_sweep_plot(points: Sequence[Any], path: Path, primary: str, secondary: str) -> None:
    """PNG of two panels, ``primary`` and ``secondary`` metric against the guidance scale, one line per model
    and sampler setting (solver, steps, schedule, temperature). ``points`` have ``model``, ``sampler``
    (a ``SamplerConfig``) and ``metrics`` (name -> value or None), like ``latentlm.commands.sweep.SweepPoint``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    lines: dict[str, list[tuple[float, dict[str, Any]]]] = {}
    for p in points:
        s = p.sampler
        extra = "" if s.cfg_schedule == "constant" else f", {s.cfg_schedule}"
        extra += "" if s.temperature == 1.0 else f", T {s.temperature:g}"
        lines.setdefault(f"{p.model}: {s.sampler} {s.num_steps}{extra}", []).append((s.cfg_scale, p.metrics))
    fig = Figure(figsize=(11, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    for k, metric in enumerate((primary, secondary)):
        ax = fig.add_subplot(1, 2, k + 1)
        for label, values in lines.items():
            xy = sorted((x, m[metric]) for x, m in values if m.get(metric) is not None)
            if xy:
                ax.plot(*zip(*xy, strict=True), marker="o", lw=1.5, label=label)
        ax.set_xlabel("guidance scale")
        ax.set_ylabel(metric.replace("_", " "))
        ax.grid(alpha=0.3)
    fig.axes[0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
