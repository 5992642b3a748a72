"""``latentlm sweep``: checkpoints scored over a grid of sampler settings, with the curves a researcher plots.

The grid is every combination of guidance scale, guidance schedule (LatentLM only: DiT points keep
"constant"), solver, solver steps and temperature, for every checkpoint. Each point is one
``sample-many`` run (``out/points/<point>.npz``, resumable shards, world-size independent) scored like
``evaluate`` (``out/points/<point>.eval.json``), by one ``Scorer`` for the whole sweep, so the Inception
network is loaded once and the digits classifier is fitted once. A point whose scores exist for the same
generation settings is not regenerated, so a killed sweep rerun with the same options finishes only what
is missing.

Outputs: ``out/sweep.json`` (every point with its settings and metrics, and the best point per model and
metric), ``out/sweep.png`` (the primary metric — FID, or the digits' Fréchet ratio — and the second one —
IS, or class accuracy — against the guidance scale, one line per model/solver/steps/schedule/temperature),
and a table on stdout.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from latentlm.checkpoint import Checkpoint, resolve_checkpoint
from latentlm.commands.evaluate import Scorer, check_scoring, images_to_score
from latentlm.commands.sample_many import existing_record, sample_many
from latentlm.config import SAMPLERS, ConfigError, EvaluateConfig, ModelConfig, SamplerConfig, SweepConfig, from_dict
from latentlm.distributed import Distributed
from latentlm.io import read_json, write_json
from latentlm.lock import hold as hold_lock
from latentlm.visualize import save_sweep_plot

log = logging.getLogger(__name__)

# metric -> True when lower is better
METRICS = {"fid": True, "sfid": True, "inception_score": False, "precision": False, "recall": False,
           "digits_frechet_ratio": True, "digits_accuracy": False}


@dataclass
class SweepPoint:
    """One (checkpoint, sampler settings) point of the grid and its scores (``metrics``: flat names)."""

    model: str  # the checkpoint's label: run directory, preset, step
    checkpoint: str
    sampler: SamplerConfig
    key: str  # file stem under out/points
    metrics: dict[str, float | None] = dataclasses.field(default_factory=dict)
    reused: bool = False  # scores found on disk for the same settings

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "checkpoint": self.checkpoint, "sampler": dataclasses.asdict(self.sampler),
                "key": self.key, "metrics": self.metrics, "reused": self.reused}


def flat_metrics(metrics: dict[str, Any]) -> dict[str, float | None]:
    """``evaluate``'s metrics with the digits ones at the top level: ``digits_accuracy``, ... ."""
    flat = {k: v for k, v in metrics.items() if k in METRICS}
    flat.update({f"digits_{k}": v for k, v in metrics.get("digits", {}).items() if f"digits_{k}" in METRICS})
    return flat


def _label(ckpt: Checkpoint) -> str:
    run = ckpt.path.parent.parent.name if ckpt.path.parent.name == "checkpoints" else ckpt.path.name
    return f"{run} ({ckpt.train_config['model']['name']}, step {ckpt.step})"


def grid(cfg: SweepConfig, index: int, model: ModelConfig) -> list[SamplerConfig]:
    """The sampler settings of the grid that fit ``model`` (DiT: constant schedule only; each solver must fit
    the model's process)."""
    solvers = cfg.solvers or ((cfg.sampler.sampler,) if cfg.sampler.sampler in SAMPLERS[model.process.kind]
                              else SAMPLERS[model.process.kind][:1])
    schedules = ("constant",) if model.family == "dit" else cfg.cfg_schedules
    points = []
    for solver, steps, schedule, scale, temperature in itertools.product(
            solvers, cfg.num_steps, dict.fromkeys(schedules), cfg.cfg_scales, cfg.temperatures):
        sampler = dataclasses.replace(cfg.sampler, sampler=solver, num_steps=steps, cfg_schedule=schedule,
                                      cfg_scale=scale, temperature=temperature)
        try:
            sampler.validate(model)
        except ConfigError as err:
            raise ConfigError(f"checkpoints[{index}]: {err}") from err
        points.append(sampler)
    return points


def _point_key(index: int, s: SamplerConfig) -> str:
    return f"m{index}-{s.sampler}{s.solver_order if s.sampler == 'dpm_solver' else ''}-{s.num_steps}steps-" \
           f"{s.cfg_schedule}-cfg{s.cfg_scale:g}-t{s.temperature:g}"


def _evaluate_config(cfg: SweepConfig, point: SweepPoint, points_dir: Path) -> EvaluateConfig:
    fields = {f.name for f in dataclasses.fields(EvaluateConfig)} & {f.name for f in dataclasses.fields(cfg)}
    shared = {name: getattr(cfg, name) for name in fields if name not in ("sampler", "out")}
    return EvaluateConfig(**shared, checkpoint=point.checkpoint, sampler=point.sampler,
                          out=str(points_dir / f"{point.key}.npz"), results=str(points_dir / f"{point.key}.eval.json"))


def _run_point(point: SweepPoint, ecfg: EvaluateConfig, scorer: Scorer, dist: Distributed) -> None:
    """Generate (resuming) and score one point, unless its scores exist for the same generation settings."""
    results_path = Path(ecfg.results)
    record = existing_record(ecfg.out)
    if record is not None and results_path.is_file():
        found = read_json(results_path)
        if found.get("generation") == record["settings"]:
            point.metrics, point.reused = flat_metrics(found["metrics"]), True
            return
    sample_many(ecfg)
    if not dist.is_main:
        return
    samples = Path(ecfg.out)
    num_images, _, side = images_to_score(samples, None)
    metrics = scorer.score(samples, num_images, side)
    write_json(results_path, {"metrics": metrics, "generation": existing_record(samples)["settings"],
                              **scorer.describe()})
    point.metrics = flat_metrics(metrics)


def best_points(points: list[SweepPoint]) -> dict[str, dict[str, dict[str, Any]]]:
    """For each model and metric it has: the best point's key, sampler settings and value."""
    best: dict[str, dict[str, dict[str, Any]]] = {}
    for model in dict.fromkeys(p.model for p in points):
        mine = [p for p in points if p.model == model]
        for metric, lower in METRICS.items():
            scored = [p for p in mine if p.metrics.get(metric) is not None]
            if scored:
                top = (min if lower else max)(scored, key=lambda p, m=metric: p.metrics[m])
                best.setdefault(model, {})[metric] = {"key": top.key, "value": top.metrics[metric],
                                                      "sampler": dataclasses.asdict(top.sampler)}
    return best


def format_table(points: list[SweepPoint]) -> str:
    """One row per point: model, solver, steps, schedule, scale, temperature, then every metric present."""
    names = [m for m in METRICS if any(p.metrics.get(m) is not None for p in points)]
    width = max(len(p.model) for p in points)
    header = f"{'model':<{width}}  {'solver':<12}{'steps':>6}  {'schedule':<9}{'cfg':>6}{'temp':>6}" + "".join(
        f"{n:>22}" for n in names)
    rows = [header, "-" * len(header)]
    for p in points:
        s = p.sampler
        cells = "".join(f"{p.metrics[n]:>22.4f}" if p.metrics.get(n) is not None else f"{'-':>22}" for n in names)
        rows.append(f"{p.model:<{width}}  {s.sampler:<12}{s.num_steps:>6}  {s.cfg_schedule:<9}{s.cfg_scale:>6g}"
                    f"{s.temperature:>6g}{cells}")
    return "\n".join(rows)


def sweep(cfg: SweepConfig) -> list[SweepPoint]:
    """Run ``latentlm sweep`` (see the module docstring); returns the points (scores on the first process)."""
    # Setup: every checkpoint and every grid point is checked before any generation ----------------------
    cfg.validate()
    points: list[SweepPoint] = []
    kinds = set()
    for index, path in enumerate(cfg.checkpoints):
        try:
            ckpt = Checkpoint(resolve_checkpoint(path))
            ckpt.verify_file("ema.safetensors" if cfg.ema else "model.safetensors")  # bit rot: refused up front
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"checkpoints[{index}]={path}: {err}") from err
        kinds.add(ckpt.train_config.get("data", {}).get("kind"))
        model = from_dict(ModelConfig, ckpt.train_config["model"])
        points += [SweepPoint(_label(ckpt), str(ckpt.path), s, _point_key(index, s)) for s in grid(cfg, index, model)]
    probe = EvaluateConfig(reference=cfg.reference, inception_weights=cfg.inception_weights)
    digits = all(check_scoring(probe, kind) for kind in kinds)
    scorer = Scorer(_evaluate_config(cfg, points[0], Path(cfg.out)), digits)
    dist = Distributed.start(cfg.device)
    out, points_dir = Path(cfg.out), Path(cfg.out) / "points"
    if dist.is_main:
        log.info("sweep: %d points over %d checkpoint(s) in %s", len(points), len(cfg.checkpoints), out)

    # Points, then the summary (first process); one sweep writes `out` at a time -----------------------
    with hold_lock(out, dist, "--out"):
        for i, point in enumerate(points, start=1):
            if dist.is_main:
                log.info("point %d/%d: %s", i, len(points), point.key)
            _run_point(point, _evaluate_config(cfg, point, points_dir), scorer, dist)
        if dist.is_main:
            write_json(out / "sweep.json", {"points": [p.as_dict() for p in points], "best": best_points(points),
                                            "scoring": scorer.describe()})
            primary, secondary = ("digits_frechet_ratio", "digits_accuracy") if digits else ("fid",
                                                                                              "inception_score")
            save_sweep_plot(points, out / "sweep.png", primary, secondary)
            print(format_table(points))
            print(f"sweep: {out / 'sweep.json'}, plot: {out / 'sweep.png'}")
    return points


def run(cfg: SweepConfig) -> int:
    sweep(cfg)
    return 0
