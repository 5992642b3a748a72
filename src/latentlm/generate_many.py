"""Large-scale generation for FID-50K (``latentlm sample-many``): sharded, resumable, world-size independent.

The N images are indexed k = 0..N-1. Image k's class is a function of k alone (``plan_labels``) and
its noise comes from a generator seeded by (seed, k) (``model.generate(sample_indices=...)``). The
indices are cut into fixed shards of ``images_per_shard`` consecutive images; within a shard, images
are generated in fixed batches of ``batch_size``. So every image is computed in exactly the same
batch whatever the number of processes, and the output is byte-identical for 1, 2 or 64 processes
(at the same thread count per process, on the same kind of device).

Layout while running, for ``--out samples/fid50k.npz``::

    samples/fid50k.shards/settings.json      what is being generated (a resume must match it)
    samples/fid50k.shards/shard_00012.npz    images 12000..12999: "images" uint8 (n, S, S, 3), "labels" (n,)

Each shard is written to a temporary name and renamed, so a shard file that exists is complete; a
killed run resumes by skipping them. When every shard exists, the first process streams them, one at
a time, into the final ADM-evaluator file::

    samples/fid50k.npz    arr_0: uint8 (N, S, S, 3) NHWC; arr_1: int64 labels (N,)
    samples/fid50k.json   every setting (checkpoint, sampler, steps, CFG, EMA, seed, N, ...) + run info

Memory stays bounded by one shard of uint8 images per process, whatever N is. The ``.npz`` files are
written by ``NpzWriter`` (uncompressed members with fixed timestamps), so equal arrays give equal bytes.

Labels in per-class mode are interleaved: image k has class ``k mod num_classes``, so every class
appears exactly ``per_class`` times and any prefix of m * num_classes images is class-balanced
(the first 10,000 images of an FID-50K file are a valid balanced FID-10K set).
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import time
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

import latentlm
from latentlm.checkpoint import atomic_write, read_json, write_json
from latentlm.config import ConfigError, SampleManyConfig, to_dict
from latentlm.sample import check_sampling_options, load_for_sampling, to_uint8

log = logging.getLogger(__name__)

FORMAT = "latentlm-samples-v1"
_LABEL_STREAM = 0x6C61626C  # second SeedSequence word of random-class labels ("labl"): apart from noise streams
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed member timestamps, so equal arrays give byte-equal files
_SHARD = re.compile(r"^shard_(\d{5,})\.npz$")
# The last barrier waits for the slowest process's last shard, which can take hours on big models;
# the default 30-minute collective timeout would kill a healthy run.
_BARRIER_TIMEOUT = timedelta(hours=48)


# ---------------------------------------------------------------------------------------------
# ADM .npz files: streamed, deterministic writing; header-only and streamed reading
# ---------------------------------------------------------------------------------------------


class NpzWriter:
    """Write a ``.npz`` (an uncompressed zip of ``.npy`` members) one member at a time.

    ``write_stream`` takes an array's rows in chunks, so a 10 GB ``arr_0`` never has to be in memory.
    Members carry a fixed timestamp (numpy's ``savez`` stamps the current time), so the same arrays
    always give the same bytes. ``np.load`` and the ADM evaluator read the result as usual.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self._zip = zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True)

    def write(self, name: str, array: np.ndarray) -> None:
        """Add ``array`` as member ``<name>.npy``."""
        array = np.asarray(array)
        self.write_stream(name, array.shape, array.dtype, [array])

    def write_stream(self, name: str, shape: tuple[int, ...], dtype: np.dtype | type,
                     chunks: Iterable[np.ndarray]) -> None:
        """Add member ``<name>.npy`` of ``shape``/``dtype`` from ``chunks`` (C-order pieces, concatenated).

        Raises ``ValueError`` when the chunks do not hold exactly ``prod(shape)`` values.
        """
        dtype = np.dtype(dtype)
        info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_DATE)
        info.compress_type = zipfile.ZIP_STORED
        info.external_attr = 0o644 << 16  # -rw-r--r-- for unzip, independent of the umask
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                  "shape": tuple(int(s) for s in shape)}
        expected = math.prod(header["shape"]) * dtype.itemsize
        written = 0
        with self._zip.open(info, "w", force_zip64=True) as member:
            np.lib.format.write_array_header_1_0(member, header)
            for chunk in chunks:
                chunk = np.ascontiguousarray(chunk, dtype=dtype)
                member.write(memoryview(chunk).cast("B"))
                written += chunk.nbytes
        if written != expected:
            raise ValueError(f"{name}: chunks hold {written} bytes, shape {header['shape']} needs {expected}")

    def close(self) -> None:
        self._zip.close()

    def __enter__(self) -> NpzWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_npy_header(member: Any) -> tuple[tuple[int, ...], np.dtype, bool]:
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(member)
    return np.lib.format.read_array_header_2_0(member)


def npz_keys(path: str | os.PathLike) -> list[str]:
    """Array names in a ``.npz`` (member names without ``.npy``), without reading any data."""
    try:
        with zipfile.ZipFile(path) as zf:
            return [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
    except zipfile.BadZipFile as err:
        raise ValueError(f"{path} is not a .npz file (not a zip archive: {err})") from err


def npz_array_info(path: str | os.PathLike, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """``(shape, dtype)`` of array ``key`` of a ``.npz``, read from its header only."""
    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as member:
        shape, fortran_order, dtype = _read_npy_header(member)
    if fortran_order:
        raise ValueError(f"{path}: {key} is stored in Fortran order; save it C-ordered (np.ascontiguousarray)")
    return tuple(shape), dtype


def iter_npz_rows(path: str | os.PathLike, key: str, batch_size: int, limit: int | None = None
                  ) -> Iterator[np.ndarray]:
    """Consecutive batches ``(<= batch_size, *shape[1:])`` of the rows of array ``key``, streamed.

    Works for compressed and uncompressed members alike; memory holds one batch. ``limit`` stops
    after that many rows.
    """
    shape, dtype = npz_array_info(path, key)
    rows = shape[0] if limit is None else min(limit, shape[0])
    row_bytes = math.prod(shape[1:]) * dtype.itemsize
    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as member:
        _read_npy_header(member)
        for start in range(0, rows, batch_size):
            count = min(batch_size, rows - start)
            data = member.read(count * row_bytes)
            if len(data) != count * row_bytes:
                raise ValueError(f"{path}: {key} ends after {start} rows, its header says {shape[0]}")
            yield np.frombuffer(bytearray(data), dtype=dtype).reshape(count, *shape[1:])  # writable


# ---------------------------------------------------------------------------------------------
# The plan: which image has which index, class and shard
# ---------------------------------------------------------------------------------------------


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


def shard_bounds(shard: int, num_images: int, images_per_shard: int) -> tuple[int, int]:
    """``[start, stop)`` image indices of ``shard``."""
    start = shard * images_per_shard
    return start, min(start + images_per_shard, num_images)


def num_shards(num_images: int, images_per_shard: int) -> int:
    return -(-num_images // images_per_shard)


def assign_shards(pending: list[int], rank: int, world_size: int) -> list[int]:
    """The shards process ``rank`` generates: every ``world_size``-th of the sorted pending ones.

    Dealing out only the unfinished shards keeps a resumed run balanced whatever was done before.
    """
    return sorted(pending)[rank::world_size]


def shard_path(shards_dir: Path, shard: int) -> Path:
    return shards_dir / f"shard_{shard:05d}.npz"


def output_paths(out: str | os.PathLike) -> tuple[Path, Path, Path]:
    """``(<out>.npz, <out stem>.json, <out stem>.shards/)`` for an ``--out`` path ending in ``.npz``."""
    out = Path(out)
    return out, out.with_suffix(".json"), out.with_suffix(".shards")


# ---------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------


@dataclass
class _Processes:
    """This process's place in a ``torchrun`` / ``accelerate launch`` job (rank 0 of 1 when run alone)."""

    rank: int
    world_size: int
    local_rank: int
    group: Any = None  # a gloo group used only for barriers
    owns_default_group: bool = False

    @classmethod
    def from_environment(cls) -> _Processes:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        procs = cls(rank, world_size, local_rank)
        if world_size > 1:
            if not dist.is_initialized():
                dist.init_process_group("gloo", timeout=_BARRIER_TIMEOUT)
                procs.owns_default_group = True
            # Barriers run on CPU over gloo whatever the device, with a timeout long enough for a shard.
            procs.group = dist.new_group(backend="gloo", timeout=_BARRIER_TIMEOUT)
        return procs

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=self.group)

    def close(self) -> None:
        if self.owns_default_group and dist.is_initialized():
            dist.destroy_process_group()


def _device(spec: str, local_rank: int) -> torch.device:
    if spec != "auto":
        return torch.device(spec)
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# sample-many
# ---------------------------------------------------------------------------------------------


@dataclass
class SampleManyResult:
    """What ``generate_many`` did. ``generated`` / ``skipped``: shards of this process / found finished."""

    out: Path
    record: Path
    num_images: int
    generated: list[int]
    skipped: list[int]


def check_sample_many_config(cfg: SampleManyConfig) -> None:
    """Raise ``ConfigError`` for options that are wrong before anything is loaded."""
    if not cfg.checkpoint:
        raise ConfigError("--checkpoint is required: a checkpoint directory or a run directory")
    if not cfg.out.endswith(".npz"):
        raise ConfigError(f"out={cfg.out}: must end in .npz (the ADM evaluator's format)")
    if cfg.num_images is None and cfg.per_class < 1:
        raise ConfigError(f"per_class={cfg.per_class}: must be >= 1")
    if cfg.num_images is not None and cfg.num_images < 1:
        raise ConfigError(f"num_images={cfg.num_images}: must be >= 1")
    for name in ("images_per_shard", "batch_size"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name}={getattr(cfg, name)}: must be >= 1")
    if cfg.seed < 0:
        raise ConfigError(f"seed={cfg.seed}: must be >= 0")


def _settings(cfg: SampleManyConfig, checkpoint: Path, step: int, train_config: dict[str, Any],
              tokenizer: dict[str, Any], num_classes: int, image_size: int, device: torch.device) -> dict[str, Any]:
    """Everything that decides the bytes of the output; a resume must match it exactly."""
    return {
        "format": FORMAT,
        "checkpoint": str(checkpoint.resolve()),
        "checkpoint_step": step,
        "weights": "ema" if cfg.ema else "model",
        "model": train_config["model"],
        "data_kind": train_config.get("data", {}).get("kind"),
        "tokenizer": {k: tokenizer.get(k) for k in ("kind", "config", "fingerprint", "scale", "bias")},
        "sampler": to_dict(cfg.sampler),
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


def _flatten(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"sampler": {"cfg_scale": 2}}`` -> ``{"sampler.cfg_scale": 2}``, so a refusal names the exact option."""
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _ensure_same_settings(found: dict[str, Any], wanted: dict[str, Any], where: Path) -> None:
    found, wanted = _flatten(found), _flatten(wanted)
    diff = sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))
    if diff:
        detail = "; ".join(f"{k}: {found.get(k)!r} there, {wanted.get(k)!r} now" for k in diff[:4])
        raise ConfigError(f"{where} was generated with other settings ({detail}); delete it, or pass a "
                          "different --out, or rerun with the same options")


def existing_record(out: str | os.PathLike) -> dict[str, Any] | None:
    """The JSON record ``generate_many`` wrote beside a finished ``out`` (None when there is none)."""
    npz, record, _ = output_paths(out)
    if not (npz.is_file() and record.is_file()):
        return None
    found = read_json(record)
    return found if isinstance(found, dict) and found.get("settings", {}).get("format") == FORMAT else None


@torch.no_grad()
def _generate_shard(model: torch.nn.Module, tokenizer: torch.nn.Module, labels: np.ndarray, start: int, stop: int,
                    cfg: SampleManyConfig, device: torch.device, bar: tqdm) -> np.ndarray:
    """uint8 images (stop - start, S, S, 3) for indices [start, stop), in batches of ``cfg.batch_size``."""
    chunks = []
    for lo in range(start, stop, cfg.batch_size):
        hi = min(lo + cfg.batch_size, stop)
        batch_labels = torch.from_numpy(labels[lo:hi]).to(device)  # (n,)
        latents = model.generate(batch_labels, sampler=cfg.sampler, seed=cfg.seed,
                                 sample_indices=range(lo, hi))  # (n, C, h, w), normalized
        images = tokenizer.decode(latents.float())  # (n, 3, S, S) in [-1, 1]
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


def _assemble(out: Path, record_path: Path, shards_dir: Path, settings: dict[str, Any], labels: np.ndarray,
              cfg: SampleManyConfig, info: dict[str, Any]) -> None:
    """Stream every shard into ``out`` (atomically), write PNGs if asked, then the JSON record."""
    n, ips, side = len(labels), cfg.images_per_shard, settings["image_size"]
    missing = [s for s in range(num_shards(n, ips)) if not shard_path(shards_dir, s).is_file()]
    if missing:
        raise RuntimeError(f"shards {missing[:10]} are missing from {shards_dir} after every process finished")

    def shards() -> Iterator[np.ndarray]:
        for s in range(num_shards(n, ips)):
            yield _read_shard(shard_path(shards_dir, s), *shard_bounds(s, n, ips), labels, side)

    def write(tmp: Path) -> None:
        with NpzWriter(tmp) as npz:
            npz.write_stream("arr_0", (n, side, side, 3), np.uint8, shards())
            npz.write("arr_1", labels)

    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.tmp-*"):  # left by a process killed while assembling
        stale.unlink()
    atomic_write(out, write)
    if cfg.png_dir:
        from PIL import Image

        png_dir = Path(cfg.png_dir)
        png_dir.mkdir(parents=True, exist_ok=True)
        for s, images in enumerate(shards()):
            for k, image in enumerate(images, start=s * ips):
                Image.fromarray(image).save(png_dir / f"{k:06d}.png")
    write_json(record_path, {"settings": settings, **info})
    if not cfg.keep_shards:
        shutil.rmtree(shards_dir, ignore_errors=True)


def generate_many(cfg: SampleManyConfig) -> SampleManyResult:
    """``latentlm sample-many``: generate (or finish generating) ``cfg.out``; see the module docstring.

    Run it in every process of a launch; each generates its share of the missing shards and the
    first process assembles the file. Raises ``ConfigError`` for bad options (before generating),
    including an existing output or shard folder made with different settings.
    """
    # Setup ---------------------------------------------------------------------------------------
    check_sample_many_config(cfg)
    started = time.perf_counter()
    procs = _Processes.from_environment()
    try:
        device = _device(cfg.device, procs.local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        try:
            model, tokenizer, class_names, ckpt_path = load_for_sampling(cfg.checkpoint, cfg.ema, cfg.tokenizer_path,
                                                                         device)
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(str(err)) from err
        check_sampling_options(model.config, cfg.sampler)
        if cfg.weights_dtype == "bfloat16":
            model.to(torch.bfloat16)
        train_config = read_json(ckpt_path / "config.json")["train"]
        step = int(read_json(ckpt_path / "state.json")["step"])
        num_classes = model.config.num_classes
        image_size = model.config.input_size * tokenizer.downsample
        labels = plan_labels(num_classes, cfg.per_class, cfg.num_images, cfg.seed)  # (N,)
        n = len(labels)
        settings = _settings(cfg, ckpt_path, step, train_config, read_json(ckpt_path / "tokenizer.json"),
                             num_classes, image_size, device)
        out, record_path, shards_dir = output_paths(cfg.out)
        total_shards = num_shards(n, cfg.images_per_shard)

        # Finished already, or started with other settings? (every process decides the same) -----------
        if record_path.is_file() and out.is_file():
            _ensure_same_settings(read_json(record_path)["settings"], settings, record_path)
            log.info("%s is complete (%d images, same settings): nothing to do", out, n)
            return SampleManyResult(out, record_path, n, [], list(range(total_shards)))
        settings_file = shards_dir / "settings.json"
        if settings_file.is_file():
            _ensure_same_settings(read_json(settings_file), settings, shards_dir)
        elif out.exists():
            raise ConfigError(f"{out} exists but has no {record_path.name} beside it (not written by sample-many); "
                              "move it away or pass a different --out")
        if procs.rank == 0:
            shards_dir.mkdir(parents=True, exist_ok=True)
            if not settings_file.is_file():
                write_json(settings_file, settings)
            for stale in shards_dir.glob(".shard_*.tmp-*"):  # left by a killed process mid-write
                stale.unlink()
        procs.barrier()
        # Everyone lists the finished shards before anyone writes a new one, so all see the same list.
        done = {int(m.group(1)) for p in shards_dir.iterdir() if (m := _SHARD.match(p.name))}
        pending = [s for s in range(total_shards) if s not in done]
        procs.barrier()

        # Generate ------------------------------------------------------------------------------------
        mine = assign_shards(pending, procs.rank, procs.world_size)
        if procs.rank == 0:
            log.info("sample-many: %d images in %d shards (%d finished, %d to do) over %d process(es), %s weights, "
                     "%s x %d steps, CFG %g", n, total_shards, len(done), len(pending), procs.world_size,
                     settings["weights"], cfg.sampler.sampler, cfg.sampler.num_steps, cfg.sampler.cfg_scale)
        todo = sum(stop - start for start, stop in (shard_bounds(s, n, cfg.images_per_shard) for s in mine))
        with tqdm(total=todo, unit="img", desc=f"sample-many (process 0 of {procs.world_size})",
                  disable=not cfg.progress or procs.rank != 0, dynamic_ncols=True) as bar:
            for s in mine:
                start, stop = shard_bounds(s, n, cfg.images_per_shard)
                images = _generate_shard(model, tokenizer, labels, start, stop, cfg, device, bar)
                _write_shard(shard_path(shards_dir, s), images, labels[start:stop])
        procs.barrier()

        # Assemble (first process) ----------------------------------------------------------------------
        if procs.rank == 0:
            info = {
                "num_images": n,
                "shape": [n, image_size, image_size, 3],
                "class_names": class_names,
                "world_size": procs.world_size,
                "device": str(device),
                "torch_threads": torch.get_num_threads(),
                "torch_version": torch.__version__,
                "latentlm_version": latentlm.__version__,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "seconds": round(time.perf_counter() - started, 1),
            }
            _assemble(out, record_path, shards_dir, settings, labels, cfg, info)
            log.info("wrote %s (%d images) and %s", out, n, record_path.name)
        return SampleManyResult(out, record_path, n, mine, sorted(done))
    finally:
        procs.close()


__all__ = [
    "NpzWriter",
    "SampleManyResult",
    "assign_shards",
    "check_sample_many_config",
    "existing_record",
    "generate_many",
    "iter_npz_rows",
    "npz_array_info",
    "npz_keys",
    "num_shards",
    "output_paths",
    "plan_labels",
    "shard_bounds",
]
