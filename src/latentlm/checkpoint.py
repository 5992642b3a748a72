"""Crash-proof training checkpoints: one directory per step, a completeness marker written last.

Layout of ``<output_dir>/checkpoints/step-00001000/``::

    model.safetensors   training weights (fp32)
    ema.safetensors     EMA weights (what sampling uses by default)
    config.json         the run's config: {"train": TrainConfig as a dict (resolved model config inside),
                        "class_names": [...]} (model runs) or {"train_tokenizer": ...} (σ-VAE runs)
    tokenizer.json      the tokenizer record: kind, constructor arguments, source file, fingerprint and
                        the normalization stats (scale = 1/std, bias = -mean) the model was trained with
    state.json          the trainer's resumable counters (step, data position, loss history, ...)
    optimizer.pt        AdamW state dict          } torch.save of tensors and plain containers only;
    schedule.pt         LR scheduler (+ GradScaler) } read back with torch.load(weights_only=True)
    rng-rank{r}.pt      torch RNG state of process r (CPU and CUDA)
    COMPLETE            JSON {"step", "world_size", "files": {relative path: {"size", "sha256"}}}: every
                        file of the directory, subfolders included; written last by atomic rename

A run with ``--strategy fsdp`` writes no model/EMA/optimizer files: instead ``sharded/`` holds them as a
``torch.distributed.checkpoint`` (``{"model", "ema", "optimizer"}``; one ``__<r>_0.distcp`` per process
and ``.metadata``), read back by ``training/sharding.py`` on any world size. ``Checkpoint.model`` / ``.ema``
read such a checkpoint's weights consolidated in one process, so sampling takes either layout, and
``latentlm export-weights`` writes them as ``model.safetensors`` / ``ema.safetensors``.

Every file is written atomically (``latentlm.io``), so a crash leaves either the old bytes or the new
ones. A directory without ``COMPLETE`` (or whose files do not match the sizes it lists) is
incomplete: resume skips it and says why. Old checkpoints are deleted only after a newer one is
complete. Any directory with a valid marker is a checkpoint, whatever its name (``best/``, a copy).

``Checkpoint`` is the one reader of these files, and it checks what it reads: sizes always, and the
sha256 of every file before its first use (a flipped byte in ``ema.safetensors`` is refused instead of
sampled), then weights for NaN/inf. Hashing runs at about 1 GB/s per core
(``benchmarks/checkpoint_hashing.py``), so it costs seconds for the GBs of a large model; each file is
hashed only when read (``sample`` hashes the EMA weights, a resume every file, on the first process
only). ``LATENTLM_VERIFY=size`` skips the hashes. Markers written before hashes were recorded (sizes
only) still load.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from latentlm.config import ConfigError
from latentlm.io import (
    BadFileError,
    file_sha256,
    fsync_dir,
    is_temporary,
    read_json,
    read_torch,
    write_json,
    write_safetensors,
    write_torch,
)

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
CHECKPOINTS_DIR = "checkpoints"
MAIN_FILES = ("model.safetensors", "ema.safetensors", "config.json", "tokenizer.json", "state.json",
              "optimizer.pt", "schedule.pt")
SHARDED_DIR = "sharded"  # FSDP runs: torch.distributed.checkpoint of model, EMA and optimizer
SHARDED_FILES = ("config.json", "tokenizer.json", "state.json", "schedule.pt", f"{SHARDED_DIR}/.metadata")
WEIGHTS_FILES = ("model.safetensors", "ema.safetensors", "config.json", "tokenizer.json", "state.json")  # exports
_STEP_DIR = re.compile(r"^step-(\d+)$")
VERIFY_ENV = "LATENTLM_VERIFY"  # "hash" (default): sizes and sha256 of every file read; "size": sizes only


class NonFiniteWeightsError(RuntimeError):
    """Weights with NaN/inf were about to be checkpointed; nothing was written."""


class CorruptCheckpoint(ConfigError):
    """A checkpoint file differs from what its ``COMPLETE`` marker recorded, or holds NaN/inf weights."""


def checkpoint_dir(output_dir: str | os.PathLike, step: int) -> Path:
    """``<output_dir>/checkpoints/step-<step, 8 digits>``."""
    return Path(output_dir) / CHECKPOINTS_DIR / f"step-{step:08d}"


def check_finite(state: dict[str, torch.Tensor], what: str) -> None:
    """Raise ``NonFiniteWeightsError`` naming the first tensor of ``state`` with NaN/inf."""
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise NonFiniteWeightsError(f"{what} tensor {name!r} has NaN/inf values; refusing to checkpoint it")


# ---------------------------------------------------------------------------------------------
# Writing a checkpoint
# ---------------------------------------------------------------------------------------------


def begin_checkpoint(path: Path) -> None:
    """Prepare an empty directory for a new checkpoint (a stale incomplete one is removed first)."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)


def write_main_files(
    path: Path,
    *,
    model: dict[str, torch.Tensor] | None,
    ema: dict[str, torch.Tensor] | None,
    config: dict[str, Any],
    tokenizer: dict[str, Any],
    state: dict[str, Any],
    optimizer: dict[str, Any] | None,
    schedule: dict[str, Any] | None,
) -> None:
    """Write everything but the per-process RNG files and the marker (main process only). ``None``: written
    elsewhere (FSDP runs write weights, EMA and optimizer sharded) or not at all (schedule of an export).

    Weights are checked first: non-finite weights are never written (``NonFiniteWeightsError``).
    """
    for name, weights in (("model", model), ("EMA", ema)):
        if weights is not None:
            check_finite(weights, name)
    if model is not None:
        write_safetensors(path / "model.safetensors", model)
    if ema is not None:
        write_safetensors(path / "ema.safetensors", ema)
    write_json(path / "config.json", config)
    write_json(path / "tokenizer.json", tokenizer)
    write_json(path / "state.json", state)
    if optimizer is not None:
        write_torch(path / "optimizer.pt", optimizer)
    if schedule is not None:
        write_torch(path / "schedule.pt", schedule)


def rng_state() -> dict[str, torch.Tensor]:
    """This process's torch RNG state: CPU, and the current CUDA device when there is one."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def write_rng(path: Path, rank: int) -> None:
    """Each process writes its own RNG state (``rng-rank<r>.pt``)."""
    write_torch(path / f"rng-rank{rank}.pt", rng_state())


def checkpoint_files(path: Path) -> list[str]:
    """Every file under checkpoint directory ``path`` (subfolders included) as a relative POSIX path, sorted;
    the marker and staging files of ``atomic_write`` are left out."""
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*")
                  if p.is_file() and p.name != MARKER and not is_temporary(p))


def mark_complete(path: Path, step: int, world_size: int, required: tuple[str, ...] | None = None) -> None:
    """Write the ``COMPLETE`` marker, last and atomically, after checking the files a checkpoint needs are
    there (``required``; default: those of its layout and every process's RNG): it records the size and
    sha256 of every file in the directory, sub-folders included."""
    if required is None:
        layout = SHARDED_FILES if (path / SHARDED_DIR).is_dir() else MAIN_FILES
        required = (*layout, *(f"rng-rank{r}.pt" for r in range(world_size)))
    missing = [n for n in required if not (path / n).is_file()]
    if missing:
        raise RuntimeError(f"checkpoint {path} is missing {missing}; not marking it complete")
    files = checkpoint_files(path)
    with ThreadPoolExecutor(max_workers=min(8, len(files))) as pool:  # hashlib releases the GIL on big blocks
        digests = list(pool.map(lambda name: file_sha256(path / name), files))
    entries = {n: {"size": (path / n).stat().st_size, "sha256": d} for n, d in zip(files, digests, strict=True)}
    write_json(path / MARKER, {"step": step, "world_size": world_size, "files": entries})
    fsync_dir(path)
    fsync_dir(path.parent)


# ---------------------------------------------------------------------------------------------
# Finding and pruning checkpoints
# ---------------------------------------------------------------------------------------------


@dataclass
class CheckpointEntry:
    """One ``step-*`` directory; ``problem`` is None for a complete checkpoint, else why it is not."""

    step: int
    path: Path
    problem: str | None


def marker_entries(path: Path) -> dict[str, dict[str, Any]]:
    """``{relative path: {"size": ..., "sha256": ...}}`` from the marker of ``path`` (older markers: sizes only).

    Raises ``OSError`` / ``ValueError`` for a missing or unreadable marker."""
    files = read_json(path / MARKER)["files"]
    if not isinstance(files, dict):
        raise ValueError(f"'files' is a {type(files).__name__}, not a mapping")
    return {name: entry if isinstance(entry, dict) else {"size": int(entry)} for name, entry in files.items()}


def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete checkpoint (missing marker, missing file, wrong size), or None when it is."""
    if not (path / MARKER).is_file():
        return f"no {MARKER} marker (the run stopped while writing it)"
    try:
        files = marker_entries(path)
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"unreadable {MARKER} marker ({err})"
    for name, entry in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != entry.get("size"):
            return f"{name} has {file.stat().st_size} bytes, the marker says {entry.get('size')}"
    return None


def hashes_verified() -> bool:
    """Whether readers check sha256 sums (``LATENTLM_VERIFY``: "hash", the default, or "size")."""
    mode = os.environ.get(VERIFY_ENV, "hash").strip().lower() or "hash"
    if mode not in ("hash", "size"):
        raise ConfigError(f"{VERIFY_ENV}={mode!r}: use 'hash' (check sizes and sha256, the default) or 'size'")
    return mode == "hash"


def older_checkpoint(path: Path) -> Path | None:
    """The newest complete checkpoint older than ``path`` beside it (same ``checkpoints/`` folder), if any."""
    step = _STEP_DIR.match(path.name)
    older = [e for e in list_checkpoints(path.parent.parent) if e.problem is None and e.path != path
             and (step is None or e.step < int(step.group(1)))] if path.parent.name == CHECKPOINTS_DIR else []
    return older[-1].path if older else None


def _corrupt(path: Path, file: Path, what: str) -> CorruptCheckpoint:
    older = older_checkpoint(path)
    advice = (f"resume from an older checkpoint: {older}" if older is not None else
              "no older complete checkpoint is beside it; restore the file from a copy or retrain")
    return CorruptCheckpoint(f"{file} is corrupt ({what}); {advice}")


def check_loaded_finite(path: Path, file: Path, state: dict[str, torch.Tensor]) -> None:
    """Raise ``CorruptCheckpoint`` naming the first tensor of ``state`` (read from ``file``) with NaN/inf."""
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise _corrupt(path, file, f"tensor {name!r} has NaN/inf values; checkpoints never hold such weights")


def list_checkpoints(output_dir: str | os.PathLike) -> list[CheckpointEntry]:
    """All ``step-*`` directories under ``<output_dir>/checkpoints``, oldest first."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    entries = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and path.is_dir():
            entries.append(CheckpointEntry(int(match.group(1)), path, checkpoint_problem(path)))
    return sorted(entries, key=lambda e: e.step)


def latest_checkpoint(output_dir: str | os.PathLike, report: Callable[[str], None] = log.warning) -> Path | None:
    """The newest complete checkpoint under ``output_dir``; newer incomplete ones are reported and skipped."""
    for entry in reversed(list_checkpoints(output_dir)):
        if entry.problem is None:
            return entry.path
        report(f"skipping incomplete checkpoint {entry.path}: {entry.problem}")
    return None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory from a checkpoint (any directory with a ``COMPLETE`` marker, whatever its name),
    a ``checkpoints/`` folder or a run directory (its newest complete checkpoint).

    Raises ``FileNotFoundError`` (nothing there) or ``ValueError`` (an incomplete checkpoint).
    """
    path = Path(path)
    if path.is_dir() and ((path / MARKER).is_file() or _STEP_DIR.match(path.name)):
        problem = checkpoint_problem(path)
        if problem:
            raise ValueError(f"checkpoint {path} is incomplete: {problem}")
        return path
    run_dir = path.parent if path.name == CHECKPOINTS_DIR else path
    found = latest_checkpoint(run_dir)
    if found is None:
        raise FileNotFoundError(f"no complete checkpoint at {path} (expected a {MARKER} marker there, or step-* "
                                f"under {run_dir / CHECKPOINTS_DIR})")
    return found


def prune_checkpoints(output_dir: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints, and incomplete ones older than the
    newest complete one. Returns the deleted paths."""
    entries = list_checkpoints(output_dir)
    complete = [e for e in entries if e.problem is None]
    if not complete:
        return []
    newest = complete[-1].step
    doomed = list(complete[:-keep_last]) if keep_last > 0 else []
    doomed += [e for e in entries if e.problem is not None and e.step < newest]
    for entry in doomed:
        shutil.rmtree(entry.path, ignore_errors=True)
    return [e.path for e in doomed]


# ---------------------------------------------------------------------------------------------
# Reading a checkpoint
# ---------------------------------------------------------------------------------------------


class Checkpoint:
    """A complete checkpoint on disk. The small JSON files are read on opening; weights, optimizer and
    schedule on first access (on CPU); RNG states per process (``rng``). Every file is checked against the
    marker before its first use (``verify=False``, or ``LATENTLM_VERIFY=size``: sizes only), weights for
    NaN/inf too; a mismatch raises ``CorruptCheckpoint``."""

    def __init__(self, path: str | os.PathLike, verify: bool = True) -> None:
        self.path = Path(path)
        problem = checkpoint_problem(self.path)
        if problem:
            raise ValueError(f"checkpoint {self.path} is incomplete: {problem}")
        self._entries = marker_entries(self.path)
        self._verify = verify and hashes_verified()
        self._checked: set[str] = set()
        self.config: dict[str, Any] = read_json(self._file("config.json"))
        self.tokenizer: dict[str, Any] = read_json(self._file("tokenizer.json"))
        self.state: dict[str, Any] = read_json(self._file("state.json"))
        self.step = int(self.state["step"])
        self.sharded = (self.path / SHARDED_DIR).is_dir()  # an FSDP run's checkpoint
        self.weights_only = not self.sharded and not (self.path / "optimizer.pt").is_file()  # an export

    def verify_file(self, name: str) -> None:
        """Check the sha256 of file ``name`` now (``CorruptCheckpoint`` when it differs from the marker)."""
        self._file(name)

    def _file(self, name: str) -> Path:
        """``path / name``, its sha256 checked against the marker on first use."""
        file = self.path / name
        digest = self._entries.get(name, {}).get("sha256")
        if self._verify and digest and name not in self._checked:
            if file_sha256(file) != digest:
                raise _corrupt(self.path, file, f"sha256 differs from the {MARKER} marker")
            self._checked.add(name)
        return file

    def _weights(self, name: str) -> dict[str, torch.Tensor]:
        file = self._file(name)
        try:
            state = load_file(file)
        except Exception as err:  # safetensors raises its own error types for a damaged header
            raise _corrupt(self.path, file, f"not a readable safetensors file: {err}") from err
        check_loaded_finite(self.path, file, state)
        return state

    def verify(self) -> None:
        """Check every file now (sizes were checked on opening): hashes, and the weights for NaN/inf."""
        for name in self._entries:
            self._file(name)
        _ = self.model, self.ema

    @cached_property
    def model(self) -> dict[str, torch.Tensor]:
        return self._consolidated("model") if self.sharded else self._weights("model.safetensors")

    @cached_property
    def ema(self) -> dict[str, torch.Tensor]:
        return self._consolidated("ema") if self.sharded else self._weights("ema.safetensors")

    @cached_property
    def optimizer(self) -> dict[str, Any]:
        if self.sharded:
            raise ValueError(f"{self.path} is sharded: its optimizer state is read by training/sharding.load")
        return read_torch(self._file("optimizer.pt"))

    def _consolidated(self, key: str) -> dict[str, torch.Tensor]:
        """The full fp32 ``key`` ("model" / "ema") state of a sharded checkpoint, read in this process alone:
        torch.distributed.checkpoint assembles every process's shards into tensors of the full shape."""
        import torch.distributed.checkpoint as dcp

        from latentlm.config import ModelConfig, from_dict
        from latentlm.models import model_from_config

        for name in self.shard_files():
            self._file(name)
        with torch.device("meta"):  # shapes and names only
            template = model_from_config(from_dict(ModelConfig, self.train_config["model"])).state_dict()
        state = {key: {k: torch.empty(v.shape, dtype=v.dtype) for k, v in template.items()}}
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=self.path / SHARDED_DIR, no_dist=True)
        check_loaded_finite(self.path, self.path / SHARDED_DIR, state[key])
        return state[key]

    def shard_files(self) -> list[str]:
        """The files of a sharded checkpoint's ``sharded/`` folder, as its marker lists them (else none)."""
        return [name for name in self._entries if name.startswith(f"{SHARDED_DIR}/")]

    @cached_property
    def schedule(self) -> dict[str, Any]:
        return read_torch(self._file("schedule.pt"))

    def rng(self, rank: int) -> dict[str, torch.Tensor] | None:
        """Process ``rank``'s RNG state, or None if that process did not exist then."""
        name = f"rng-rank{rank}.pt"
        return read_torch(self._file(name)) if (self.path / name).is_file() else None

    @property
    def train_config(self) -> dict[str, Any]:
        """The model run's ``TrainConfig`` as a dict (``config.json["train"]``)."""
        return self.config["train"]

    @property
    def class_names(self) -> list[str]:
        num_classes = self.train_config["model"]["num_classes"]
        return list(self.config.get("class_names") or [str(i) for i in range(num_classes)])


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open a complete checkpoint (``ValueError`` when it is incomplete)."""
    return Checkpoint(path)


@dataclass
class TrainedModel:
    """What sampling needs from a run: the model (eval mode), its tokenizer with the run's normalization."""

    model: torch.nn.Module
    tokenizer: torch.nn.Module
    class_names: list[str]
    checkpoint: Checkpoint


def load_trained(checkpoint: str | os.PathLike, ema: bool = True, tokenizer_path: str | None = None,
                 device: str | torch.device = "cpu") -> TrainedModel:
    """The model and tokenizer of ``checkpoint`` (a checkpoint directory, or a run directory: its newest
    complete checkpoint) on ``device``. ``tokenizer_path`` overrides the tokenizer file it records.

    Raises ``FileNotFoundError`` / ``ValueError`` saying what is missing or does not fit.
    """
    from latentlm.config import ModelConfig, from_dict
    from latentlm.models import model_from_config
    from latentlm.tokenizers import tokenizer_from_record

    ckpt = Checkpoint(resolve_checkpoint(checkpoint))
    model = model_from_config(from_dict(ModelConfig, ckpt.train_config["model"]))
    try:
        model.load_state_dict(ckpt.ema if ema else ckpt.model)
    except RuntimeError as err:  # names the missing, unexpected and wrong-shape tensors
        raise BadFileError(f"{ckpt.path}: the weights do not fit the model of its config.json "
                           f"({' '.join(str(err).split())[:300]}); the checkpoint is damaged or was edited") from err
    tokenizer = tokenizer_from_record(ckpt.tokenizer, path=tokenizer_path).to(device)
    return TrainedModel(model.to(device).eval(), tokenizer, ckpt.class_names, ckpt)
