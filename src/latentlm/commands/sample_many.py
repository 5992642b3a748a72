"""``latentlm sample-many``: large-scale generation for FID-50K — sharded, resumable, world-size independent.

The N images are indexed k = 0..N-1. Image k's class is a function of k alone (``plan_labels``) and
its noise comes from a generator seeded by (seed, k) (``model.generate(sample_indices=...)``). The
indices are cut into fixed shards of ``images_per_shard`` consecutive images (``latentlm.shards``);
within a shard, images are generated in fixed batches of ``batch_size``. So every image is computed
in exactly the same batch whatever the number of processes, and the output is byte-identical for 1, 2
or 64 processes (at the same thread count per process, on the same kind of device).

Layout while running, for ``--out samples/fid50k.npz``::

    samples/fid50k.shards/plan.json             what is being generated (a resume must match it)
    samples/fid50k.shards/shard-000012.npz      images 12000..12999: "images" uint8 (n, S, S, 3), "labels" (n,)

When every shard exists, the first process streams them, one at a time, into the final ADM-evaluator
file::

    samples/fid50k.npz    arr_0: uint8 (N, S, S, 3) NHWC; arr_1: int64 labels (N,)
    samples/fid50k.json   every setting (checkpoint, sampler, steps, CFG, EMA, seed, N, ...) + run info

Memory stays bounded by one shard of uint8 images per process, whatever N is. The ``.npz`` files are
deterministic (``latentlm.io.NpzWriter``), so equal arrays give equal bytes.

Labels in per-class mode are interleaved: image k has class ``k mod num_classes``, so every class
appears exactly ``per_class`` times and any prefix of m * num_classes images is class-balanced
(the first 10,000 images of an FID-50K file are a valid balanced FID-10K set).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

import latentlm
from latentlm.checkpoint import TrainedModel, load_trained
from latentlm.config import ConfigError, SampleManyConfig, to_dict
from latentlm.distributed import Distributed
from latentlm.io import NpzWriter, atomic_write, read_json, write_json
from latentlm.lock import hold as hold_lock
from latentlm.shards import ShardDir, ShardPlan, check_same_settings
from latentlm.visualize import to_uint8

log = logging.getLogger(__name__)

FORMAT = "latentlm-samples-v1"
_LABEL_STREAM = 0x6C61626C  # second SeedSequence word of random-class labels ("labl"): apart from noise streams


def plan_labels(num_classes: int, per_class: int = 50, num_images: int | None = None, seed: int = 0) -> np.ndarray:
    """Class of every image index, int64 (N,).

    ``num_images`` None: N = per_class * num_classes and image k has class ``k mod num_classes``.
    Otherwise N = num_images classes drawn uniformly from a generator seeded by (seed, "labl");
    the draw is prefix-stable (label k does not depend on N).
    """
    if num_classes < 1:
        raise ValueError(f"num_classes={num_classes}: must be >= 1")
    if num_images is None:
        if per_class < 1:
            raise ValueError(f"per_class={per_class}: must be >= 1")
        return np.arange(per_class * num_classes, dtype=np.int64) % num_classes
    if num_images < 1:
        raise ValueError(f"num_images={num_images}: must be >= 1")
    rng = np.random.default_rng(np.random.SeedSequence([seed, _LABEL_STREAM]))
    return rng.integers(0, num_classes, size=num_images, dtype=np.int64)


def output_paths(out: str | os.PathLike) -> tuple[Path, Path, Path]:
    """``(<out>.npz, <out stem>.json, <out stem>.shards/)`` for an ``--out`` path ending in ``.npz``."""
    out = Path(out)
    return out, out.with_suffix(".json"), out.with_suffix(".shards")


def existing_record(out: str | os.PathLike) -> dict[str, Any] | None:
    """The JSON record ``sample_many`` wrote beside a finished ``out`` (None when there is none)."""
    npz, record, _ = output_paths(out)
    if not (npz.is_file() and record.is_file()):
        return None
    found = read_json(record)
    return found if isinstance(found, dict) and found.get("settings", {}).get("format") == FORMAT else None


@dataclass
class SampleManyResult:
    """What ``sample_many`` did. ``generated`` / ``skipped``: shards of this process / found finished."""

    out: Path
    record: Path
    num_images: int
    generated: list[int]
    skipped: list[int]


def _settings(cfg: SampleManyConfig, trained: TrainedModel, image_size: int, device: torch.device) -> dict[str, Any]:
    """Everything that decides the bytes of the output; a resume must match it exactly."""
    ckpt, num_classes = trained.checkpoint, trained.model.config.num_classes
    return {
        "format": FORMAT,
        "checkpoint": str(ckpt.path.resolve()),
        "checkpoint_step": ckpt.step,
        "weights": "ema" if cfg.ema else "model",
        "model": ckpt.train_config["model"],
        "data_kind": ckpt.train_config.get("data", {}).get("kind"),
        "tokenizer": {k: ckpt.tokenizer.get(k) for k in ("kind", "config", "fingerprint", "scale", "bias")},
        # fused as it resolves on this device: the fused path rounds differently from the reference path.
        "sampler": {**to_dict(cfg.sampler), "fused": "on" if cfg.sampler.fused_on(device.type) else "off"},
        "seed": cfg.seed,
        "labels": "per_class" if cfg.num_images is None else "random",
        "per_class": None if cfg.num_images is not None else cfg.per_class,
        "num_classes": num_classes,
        "num_images": cfg.num_images if cfg.num_images is not None else cfg.per_class * num_classes,
        "image_size": image_size,
        "images_per_shard": cfg.images_per_shard,
        "batch_size": cfg.batch_size,
        "weights_dtype": cfg.weights_dtype,
        "device_type": device.type,
    }


@torch.no_grad()
def _identity(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings a resume must match. Records written before ``sampler.fused`` existed took the
    reference path, which is ``fused: off``."""
    sampler = settings.get("sampler")
    if isinstance(sampler, dict) and "fused" not in sampler:
        return {**settings, "sampler": {**sampler, "fused": "off"}}
    return settings


def _generate_shard(trained: TrainedModel, labels: np.ndarray, start: int, stop: int, cfg: SampleManyConfig,
                    device: torch.device, bar: tqdm) -> np.ndarray:
    """uint8 images (stop - start, S, S, 3) for indices [start, stop), in batches of ``cfg.batch_size``."""
    chunks = []
    for lo in range(start, stop, cfg.batch_size):
        hi = min(lo + cfg.batch_size, stop)
        batch_labels = torch.from_numpy(labels[lo:hi]).to(device)  # (n,)
        latents = trained.model.generate(batch_labels, sampler=cfg.sampler, seed=cfg.seed,
                                         sample_indices=range(lo, hi))  # (n, C, h, w), normalized
        images = trained.tokenizer.decode(latents.float())  # (n, 3, S, S) in [-1, 1]
        chunks.append(to_uint8(images).numpy())  # (n, S, S, 3): round((x + 1) * 127.5), clamped
        bar.update(hi - lo)
    return np.concatenate(chunks)


def _write_shard(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with NpzWriter(tmp) as npz:
            npz.write("images", images)
            npz.write("labels", labels)

    atomic_write(path, write)


def _read_shard(path: Path, start: int, stop: int, labels: np.ndarray, image_size: int) -> np.ndarray:
    """The images of a finished shard, checked against the plan."""
    with np.load(path, allow_pickle=False) as shard:
        images, shard_labels = shard["images"], shard["labels"]
    expected = (stop - start, image_size, image_size, 3)
    if images.shape != expected or images.dtype != np.uint8 or not np.array_equal(shard_labels, labels[start:stop]):
        raise ValueError(f"{path} does not hold images {start}..{stop - 1} of this run (shape {images.shape}, "
                         f"expected {expected}); delete it and rerun to regenerate it")
    return images


def _assemble(out: Path, record_path: Path, shards: ShardDir, settings: dict[str, Any], labels: np.ndarray,
              cfg: SampleManyConfig, info: dict[str, Any]) -> None:
    """Stream every shard into ``out`` (atomically), write PNGs if asked, then the JSON record."""
    n, side = len(labels), settings["image_size"]
    missing = shards.missing()
    if missing:
        raise RuntimeError(f"shards {missing[:10]} are missing from {shards.root} after every process finished")

    def images() -> Iterator[np.ndarray]:
        for s in range(shards.plan.num_shards):
            yield _read_shard(shards.path(s), *shards.plan.bounds(s), labels, side)

    def write(tmp: Path) -> None:
        with NpzWriter(tmp) as npz:
            npz.write_stream("arr_0", (n, side, side, 3), np.uint8, images())
            npz.write("arr_1", labels)

    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.tmp-*"):  # left by a process killed while assembling
        stale.unlink()
    atomic_write(out, write)
    if cfg.png_dir:
        from PIL import Image

        png_dir = Path(cfg.png_dir)
        png_dir.mkdir(parents=True, exist_ok=True)
        for s, shard in enumerate(images()):
            for k, image in enumerate(shard, start=s * cfg.images_per_shard):
                Image.fromarray(image).save(png_dir / f"{k:06d}.png")
    write_json(record_path, {"settings": settings, **info})
    if not cfg.keep_shards:
        shutil.rmtree(shards.root, ignore_errors=True)


def _load(cfg: SampleManyConfig, dist: Distributed) -> TrainedModel:
    try:
        trained = load_trained(cfg.checkpoint, cfg.ema, cfg.tokenizer_path, dist.device)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(str(err)) from err
    cfg.sampler.validate(trained.model.config)
    if cfg.weights_dtype == "bfloat16":
        trained.model.to(torch.bfloat16)
    return trained


def sample_many(cfg: SampleManyConfig) -> SampleManyResult:
    """Generate (or finish generating) ``cfg.out``; see the module docstring.

    Run it in every process of a launch; each generates its share of the missing shards and the
    first process assembles the file. Raises ``ConfigError`` for bad options (before generating),
    including an existing output or shard folder made with different settings.
    """
    # Setup ---------------------------------------------------------------------------------------
    cfg.validate()
    started = time.perf_counter()
    dist = Distributed.start(cfg.device)
    trained = _load(cfg, dist)
    with hold_lock(cfg.out, dist, "--out", directory=False):  # one writer per output file
        return _sample_many(cfg, dist, trained, started)


def _sample_many(cfg: SampleManyConfig, dist: Distributed, trained: TrainedModel, started: float
                 ) -> SampleManyResult:
    image_size = trained.model.config.input_size * trained.tokenizer.downsample
    labels = plan_labels(trained.model.config.num_classes, cfg.per_class, cfg.num_images, cfg.seed)  # (N,)
    n = len(labels)
    settings = _settings(cfg, trained, image_size, dist.device)
    out, record_path, shards_dir = output_paths(cfg.out)
    shards = ShardDir(shards_dir, ShardPlan(n, cfg.images_per_shard), ".npz")

    # Finished already, or started with other settings? ---------------------------------------------
    if record_path.is_file() and out.is_file():
        check_same_settings(_identity(read_json(record_path)["settings"]), settings, record_path, "samples")
        log.info("%s is complete (%d images, same settings): nothing to do", out, n)
        return SampleManyResult(out, record_path, n, [], list(range(shards.plan.num_shards)))
    if out.exists() and not shards.plan_file.is_file():
        raise ConfigError(f"{out} exists but has no {record_path.name} beside it (not written by sample-many); "
                          "move it away or pass a different --out")
    _, pending, mine = shards.open(dist, settings, _identity, "samples")
    done = sorted(set(range(shards.plan.num_shards)) - set(pending))

    # Generate ------------------------------------------------------------------------------------
    if dist.is_main:
        log.info("sample-many: %d images in %d shards (%d finished, %d to do) over %d process(es), %s weights, "
                 "%s x %d steps, CFG %g", n, shards.plan.num_shards, len(done), len(pending),
                 dist.world_size, settings["weights"], cfg.sampler.sampler, cfg.sampler.num_steps,
                 cfg.sampler.cfg_scale)
    todo = sum(stop - start for start, stop in map(shards.plan.bounds, mine))
    with tqdm(total=todo, unit="img", desc=f"sample-many (process 0 of {dist.world_size})",
              disable=not cfg.progress or not dist.is_main, dynamic_ncols=True) as bar:
        for s in mine:
            start, stop = shards.plan.bounds(s)
            images = _generate_shard(trained, labels, start, stop, cfg, dist.device, bar)
            _write_shard(shards.path(s), images, labels[start:stop])
    dist.barrier()

    # Assemble (first process) ----------------------------------------------------------------------
    if dist.is_main:
        info = {
            "num_images": n, "shape": [n, image_size, image_size, 3], "class_names": trained.class_names,
            "world_size": dist.world_size, "device": str(dist.device), "torch_threads": torch.get_num_threads(),
            "torch_version": torch.__version__, "latentlm_version": latentlm.__version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(time.perf_counter() - started, 1),
        }
        _assemble(out, record_path, shards, settings, labels, cfg, info)
        log.info("wrote %s (%d images) and %s", out, n, record_path.name)
    return SampleManyResult(out, record_path, n, mine, done)


def run(cfg: SampleManyConfig) -> int:
    sample_many(cfg)
    return 0
