"""What every latentlm trainer shares: the resumable state, the run directory and its log, resume,
RNG, mixed precision, the EMA, stop signals, and the step loop with its checkpoint cadence.

A trainer (``training/model.py``, ``training/tokenizer.py``) supplies one optimizer step, its
monitoring and its checkpoint contents; ``run_steps`` drives it. Everything random in a step comes
from the torch RNG, whose state is checkpointed per process, and the data order is a pure function of
(seed, micro-batch index), so a resumed run repeats the uninterrupted one exactly.

Exit codes (``latentlm.cli``): 3 stopped by SIGTERM/SIGUSR1/SIGINT after writing a checkpoint, or before
the first step (``latentlm.signals``; rerun with ``--resume auto``); 4 diverged (too many consecutive
non-finite steps, or non-finite weights).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import Sampler
from tqdm.contrib.logging import logging_redirect_tqdm

from latentlm import checkpoint as ckpt_io
from latentlm.checkpoint import Checkpoint
from latentlm.config import ConfigError
from latentlm.distributed import Distributed
from latentlm.progress import progress_bar
from latentlm.signals import EXIT_INTERRUPTED as EXIT_INTERRUPTED  # re-exported: the trainers' exit codes
from latentlm.signals import StopSignals, signal_name

log = logging.getLogger(__name__)

EXIT_DIVERGED = 4


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite steps, or non-finite weights; the last checkpoint is intact."""


@dataclass
class TrainState:
    """The counters a run resumes from (``state.json`` of every checkpoint)."""

    step: int = 0  # optimizer steps done, skipped non-finite steps included
    data_position: int = 0  # micro-batches each process has drawn
    global_micro_batch: int = 0  # images per micro-step over all processes, when data_position was counted
    dataset_size: int = 0
    world_size: int = 1
    losses: list[float] = field(default_factory=list)  # mean loss of every step from step 1; NaN if non-finite
    nonfinite_total: int = 0  # steps skipped for non-finite loss or gradients, whole run
    nonfinite_consecutive: int = 0
    bad_images: int = 0  # unreadable images skipped (all processes, every time one was drawn), whole run
    images_drawn: int = 0  # images drawn (all processes), whole run
    train_flops: int = 0  # counted training FLOPs (forward + backward, latentlm.flops), whole run

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainState:
        """A state from ``state.json``; counters older checkpoints did not record start at their defaults."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# ---------------------------------------------------------------------------------------------
# Schedules and the EMA
# ---------------------------------------------------------------------------------------------


def warmup_cosine(step: int, warmup_steps: int, max_steps: int, floor: float) -> float:
    """LR multiplier of optimizer step ``step`` (0-based): linear warm-up over ``warmup_steps``
    (1/warmup_steps .. 1), then cosine from 1 to ``floor`` at ``max_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def ema_decay_at(update: int, decay: float, warmup: bool = True) -> float:
    """EMA decay for the ``update``-th EMA update (0-based). With warm-up it ramps as (1 + t) / (10 + t)
    (0.1, 0.18, ... 0.9 at t = 80, 0.99 at t = 890) up to ``decay``, so early EMA weights follow the model
    instead of staying near the random init."""
    return min(decay, (1 + update) / (10 + update)) if warmup else decay


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """e <- e + (1 - decay)(p - e) for the (fp32 master) parameters, in one multi-tensor op (FSDP: on the
    local shards, which the EMA shares with the weights); buffers are copied."""
    ema_params, params = list(ema.parameters()), list(model.parameters())
    if len(ema_params) != len(params):
        raise ValueError(f"the EMA has {len(ema_params)} parameters, the model {len(params)}")
    torch._foreach_lerp_(ema_params, params, 1 - decay)
    for e, b in zip(ema.buffers(), model.buffers(), strict=True):
        e.copy_(b)


# ---------------------------------------------------------------------------------------------
# Data order
# ---------------------------------------------------------------------------------------------


class ShardedBatchSampler(Sampler[list[int]]):
    """Endless micro-batches of dataset indices for one process, resumable at any micro-batch.

    Global micro-batch m covers positions [b G, (b + 1) G) of epoch e's permutation, where
    e, b = divmod(m, batches per epoch) and G = micro_batch x world_size; process r takes its
    r-th slice of micro_batch indices. The permutation of epoch e is seeded by (seed, e), so
    micro-batch m is a pure function of (seed, m, r): resuming at ``start`` = micro-batches
    already consumed reproduces the uninterrupted order. The last partial batch of an epoch is
    dropped so every process gets full batches.
    """

    def __init__(self, num_items: int, micro_batch: int, rank: int, world_size: int, seed: int, start: int = 0
                 ) -> None:
        self.num_items, self.micro_batch, self.rank, self.seed, self.start = num_items, micro_batch, rank, seed, start
        self.global_batch = micro_batch * world_size
        self.batches_per_epoch = num_items // self.global_batch
        if self.batches_per_epoch < 1:
            raise ConfigError(f"the dataset has {num_items} items, fewer than one global micro-batch of "
                              f"{self.global_batch}; lower batch_size or add data")

    def permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 2**32 + epoch)
        return torch.randperm(self.num_items, generator=generator)

    def __iter__(self) -> Iterator[list[int]]:
        m, epoch, perm = self.start, -1, torch.empty(0)
        while True:
            e, b = divmod(m, self.batches_per_epoch)
            if e != epoch:
                epoch, perm = e, self.permutation(e)
            lo = b * self.global_batch + self.rank * self.micro_batch
            yield perm[lo:lo + self.micro_batch].tolist()
            m += 1


# ---------------------------------------------------------------------------------------------
# Precision, device flags, logging
# ---------------------------------------------------------------------------------------------


class Precision:
    """Mixed precision of a run: forward passes under ``torch.autocast`` (bf16/fp16), and for fp16 a
    ``GradScaler`` that scales the loss, unscales gradients before clipping and skips overflowed steps."""

    def __init__(self, mode: str, device: torch.device) -> None:
        self.device = device
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mode)
        self.scaler = torch.amp.GradScaler(device.type) if mode == "fp16" else None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Gradients in true units (call before clipping them)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """One optimizer step; False when the fp16 scaler skipped it (inf/NaN gradients; it lowers its scale)."""
        if self.scaler is None:
            optimizer.step()
            return True
        before = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        return self.scaler.get_scale() >= before

    def state_dict(self) -> dict[str, Any] | None:
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


@contextlib.contextmanager
def tf32_matmuls(enabled: bool) -> Iterator[None]:
    """TF32 matmuls and convolutions (~free speed on Ampere+ GPUs, fp32 runs only) for the duration."""
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    if enabled:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


@contextlib.contextmanager
def run_logging(run_dir: Path, dist: Distributed) -> Iterator[None]:
    """``run_dir/train.log`` gets the package's log lines (first process only) for the duration."""
    if not dist.is_main:
        yield
        return
    package_log = logging.getLogger("latentlm")
    previous_level = package_log.level
    file_log = logging.FileHandler(run_dir / "train.log")
    file_log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    package_log.addHandler(file_log)
    if previous_level == logging.NOTSET:
        package_log.setLevel(logging.INFO)  # train.log gets the INFO lines even when nobody configured logging
    try:
        yield
    finally:
        package_log.removeHandler(file_log)
        package_log.setLevel(previous_level)
        file_log.close()


def make_accelerator(device: torch.device) -> Any:
    """The run's ``Accelerator`` (DDP across processes, gradient sync, gathers) on ``device``'s kind.

    Mixed precision is ``Precision``'s job, so Accelerate's process-wide state is the same for every run
    (one process may train several times, with different precisions: the demo, notebooks, tests).
    """
    from accelerate import Accelerator

    return Accelerator(cpu=device.type == "cpu", mixed_precision="no")


# ---------------------------------------------------------------------------------------------
# Resume, RNG and checkpoints
# ---------------------------------------------------------------------------------------------


def reporter(dist: Distributed) -> Callable[..., None]:
    """``log.warning`` on the first process, silence elsewhere (every process makes the same decisions)."""
    return log.warning if dist.is_main else (lambda *args: None)


def find_resume(resume: str | None, run_dir: Path, dist: Distributed) -> Checkpoint | None:
    """The checkpoint ``resume`` asks for ("auto": the newest complete one in ``run_dir``, if any; or a path).

    Every process reads the same directory, so all pick the same checkpoint.
    """
    path = None
    if resume == "auto":
        path = ckpt_io.latest_checkpoint(run_dir, report=reporter(dist))
        if path is None and dist.is_main:
            log.info("resume=auto: no complete checkpoint under %s; starting fresh", run_dir)
    elif resume is not None:
        try:
            path = ckpt_io.resolve_checkpoint(resume)
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"resume={resume}: {err}") from err
    if path is None:
        return None
    return _verified(path, dist)


def _verified(path: Path, dist: Distributed) -> Checkpoint:
    """The checkpoint at ``path``, every file of it checked first (hashes, finite weights) by the first process:
    a damaged checkpoint is refused before any data or model work, on every process alike."""
    saved, error = None, None
    if dist.is_main:
        try:
            saved = Checkpoint(path)
            saved.verify()
        except ValueError as err:  # CorruptCheckpoint, or an incomplete one
            error = str(err)
    error = dist.broadcast(error)
    if error is not None:
        raise ckpt_io.CorruptCheckpoint(error)
    saved = saved if saved is not None else Checkpoint(path, verify=False)
    if dist.is_main:
        log.info("resuming from %s (step %d)", saved.path, saved.step)
    return saved


# Options that never change what a run computes (where it writes, what it logs, when it stops, where its
# data lives): changing them on resume keeps the resumed run equal to the uninterrupted one.
BOOKKEEPING_OPTIONS = frozenset({
    "config", "output_dir", "resume", "allow_arch_change", "max_nonfinite_steps", "log_every", "sample_every",
    "sample_classes", "tensorboard", "progress", "checkpoint_every", "keep_last", "stop_at_step", "model.name",
    "data.path", "data.num_workers", "data.max_bad_fraction", "tokenizer.path", "tokenizer.norm_images",
    "norm_images", "peak_tflops",
})
BOOKKEEPING_SECTIONS = ("sampler.",)  # the preview grids' sampler (drawn on a forked RNG)


def option_changes(saved: Any, current: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted option, saved value, current value)`` for every option of two config dicts that differs."""
    if isinstance(saved, dict) and isinstance(current, dict):
        return [change for key in sorted(set(saved) | set(current))
                for change in option_changes(saved.get(key), current.get(key), f"{prefix}{key}.")]
    saved = list(saved) if isinstance(saved, tuple) else saved
    current = list(current) if isinstance(current, tuple) else current
    return [] if saved == current else [(prefix[:-1], saved, current)]


def report_resume_changes(saved: Checkpoint, saved_config: dict[str, Any], current: dict[str, Any]) -> None:
    """Log the options that differ from the checkpoint's run, and whether the resumed run stays exact."""
    changes = option_changes(saved_config, current)
    if not changes:
        return
    listed = "; ".join(f"{name}: {a!r} -> {b!r}" for name, a, b in changes)
    inexact = [name for name, _, _ in changes
               if name not in BOOKKEEPING_OPTIONS and not name.startswith(BOOKKEEPING_SECTIONS)]
    verdict = (f"the resumed run no longer repeats the original one exactly (because of {', '.join(inexact)})"
               if inexact else "none of them changes what is computed: the resume stays exact")
    log.warning("resuming from %s with options that differ from its run: %s; %s", saved.path, listed, verdict)


def check_fresh_run(output_dir: str, resume: str | None) -> None:
    """A fresh run in a directory with checkpoints would interleave its checkpoints with the old run's
    (and prune the wrong ones): refuse it unless resuming."""
    if resume is None and any(e.problem is None for e in ckpt_io.list_checkpoints(output_dir)):
        raise ConfigError(f"output_dir={output_dir} already holds checkpoints of a run; pass --resume auto to "
                          "continue it, or choose another --output-dir")


def start_rng(saved: Checkpoint | None, dist: Distributed, seed: int, step: int) -> None:
    """Restore this process's RNG from ``saved``; else a distinct stream per process (own noise, own dropout)."""
    state = saved.rng(dist.rank) if saved is not None else None
    if state is not None:
        ckpt_io.set_rng_state(state)
        return
    if saved is not None:
        log.warning("process %d has no RNG state in %s (more processes than before): reseeding", dist.rank,
                    saved.path)
    torch.manual_seed(seed * 1000 + dist.rank + 1 + step)


def save_checkpoint(dist: Distributed, output_dir: str, step: int, keep_last: int,
                    write_shards: Callable[[Path], None] | None = None, **files: Any) -> Path:
    """Write the checkpoint of ``step`` from every process (``files``: what ``write_main_files`` takes, written
    by the first process; ``write_shards(path)``, if given, runs on every process: FSDP's sharded weights;
    every process writes its RNG), mark it complete, prune old ones."""
    path = ckpt_io.checkpoint_dir(output_dir, step)
    if dist.is_main:
        ckpt_io.begin_checkpoint(path)
    dist.barrier()
    if dist.is_main:
        ckpt_io.write_main_files(path, **files)
    if write_shards is not None:
        write_shards(path)
    ckpt_io.write_rng(path, dist.rank)
    dist.barrier()  # every file, RNG of all processes included, is on disk
    if dist.is_main:
        ckpt_io.mark_complete(path, step, dist.world_size)
        for old in ckpt_io.prune_checkpoints(output_dir, keep_last):
            log.info("deleted old checkpoint %s", old)
        log.info("saved checkpoint %s", path)
    dist.barrier()
    return path


# ---------------------------------------------------------------------------------------------
# Stop signals and the step loop
# ---------------------------------------------------------------------------------------------


class Steps(Protocol):
    """What a trainer gives ``run_steps``."""

    state: TrainState
    dist: Distributed

    def train_step(self, stop: StopSignals) -> bool:
        """One optimizer step (``state.step`` advanced); True when any process got a stop signal."""

    def monitor(self, end_step: int) -> dict[str, str] | None:
        """Log lines, TensorBoard, previews after a step; what the progress bar shows, when it changes."""

    def save(self) -> Path:
        """Write the checkpoint of ``state.step``."""


@dataclass
class LoopResult:
    interrupted: bool  # stopped by a signal after writing `checkpoint`
    checkpoint: Path | None  # newest complete checkpoint (written or resumed from)


def _stop_after_save(stop: StopSignals, dist: Distributed) -> bool:
    """Whether a signal arrived while a scheduled checkpoint was written (the first process decides for all)."""
    return bool(dist.broadcast(stop.received is not None))


def run_steps(steps: Steps, end_step: int, checkpoint_every: int, last_checkpoint: Path | None, progress: bool,
              desc: str, stop: StopSignals | None = None) -> LoopResult:
    """Step ``steps`` until ``end_step``, checkpointing every ``checkpoint_every`` steps, at the end, and at the
    step boundary after a stop signal (then return ``interrupted``). ``stop``: the command's handlers (installed
    at its start), else the loop installs its own."""
    state = steps.state
    bar = progress_bar(total=end_step, initial=min(state.step, end_step), disable=not progress, dynamic_ncols=True,
               desc=desc)
    console = logging_redirect_tqdm() if not bar.disable else contextlib.nullcontext()  # log lines above the bar
    interrupted = False
    with contextlib.ExitStack() as stack:
        stop = stop if stop is not None else stack.enter_context(StopSignals())
        stack.enter_context(stop.deferred())
        stack.enter_context(console)
        while state.step < end_step:
            interrupted = steps.train_step(stop) and state.step < end_step
            bar.update(1)
            postfix = steps.monitor(end_step)
            if postfix:
                bar.set_postfix(**postfix)
            if state.step % checkpoint_every == 0 or state.step == end_step or interrupted:
                last_checkpoint = steps.save()
                interrupted = interrupted or _stop_after_save(stop, steps.dist)
            if interrupted:
                reporter(steps.dist)("stopped by %s at step %d after saving %s; continue with --resume auto",
                                     signal_name(stop.received), state.step, last_checkpoint)
                break
    bar.close()
    return LoopResult(interrupted or stop.received is not None, last_checkpoint)
