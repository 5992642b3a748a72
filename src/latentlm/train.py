"""``latentlm train``: one top-down training function on Hugging Face Accelerate.

The same loop trains LatentLM and DiT with either process (DDPM or flow): the model returns its
own loss, ``model(latents, labels)``. It runs unchanged on a CPU, one GPU, or many GPUs and nodes
under ``accelerate launch`` / ``torchrun``.

A step is one optimizer update over ``batch_size`` images (``grad_accum_steps`` micro-batches on
each of the processes). Everything random in a step comes from the torch RNG, whose state is
checkpointed per process, and the data order is a pure function of (seed, micro-batch index),
so a resumed run repeats the uninterrupted one exactly.

Exit codes of ``latentlm train`` (see ``cli.py``): 0 finished (or reached ``stop_at_step``);
2 invalid option; 3 stopped by SIGTERM/SIGUSR1 after writing a checkpoint (rerun with
``--resume auto``); 4 diverged (too many consecutive non-finite steps, or non-finite weights).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import broadcast_object_list
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from latentlm import checkpoint as ckpt_io
from latentlm.config import ConfigError, ModelConfig, TrainConfig, from_dict, to_dict
from latentlm.data import (
    BadImage,
    build_dataset,
    check_bad_fraction,
    check_data_config,
    class_names,
    collate_skipping_bad,
    dataset_num_classes,
    select_moments,
)
from latentlm.models import model_from_config
from latentlm.sample import check_sampling_options, generate_grid
from latentlm.tokenizers import Tokenizer, build_tokenizer, tokenizer_record

log = logging.getLogger(__name__)

EXIT_INTERRUPTED = 3
EXIT_DIVERGED = 4
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# ModelConfig fields that shape the weights; the others (name, batch_mul, class_dropout_prob, process)
# only change the objective, so a resume that changes them is allowed with a warning.
ARCHITECTURE_FIELDS = ("family", "in_channels", "input_size", "patch_size", "num_classes", "depth", "hidden_size",
                       "num_heads", "num_kv_heads", "mlp_ratio", "ffn_hidden_size", "rope_theta", "head_depth")


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite steps, or non-finite weights; the last checkpoint is intact."""


@dataclass
class TrainResult:
    """What ``train`` returns."""

    step: int  # optimizer steps done, skipped non-finite steps included
    losses: list[float]  # mean loss of every step from step 1 (across resumes); NaN for non-finite steps
    run_dir: Path
    checkpoint: Path | None  # newest complete checkpoint (written or resumed from)
    interrupted: bool  # stopped by SIGTERM/SIGUSR1 after writing `checkpoint`
    nonfinite_steps: int  # steps skipped for non-finite loss or gradients, whole run
    bad_images: int  # unreadable images skipped (all processes, every time one was drawn), whole run
    model: nn.Module = dataclasses.field(repr=False)  # the trained weights (unwrapped, on the training device)
    ema: nn.Module = dataclasses.field(repr=False)  # their EMA (what samples use)


# ---------------------------------------------------------------------------------------------
# Pieces the training function uses
# ---------------------------------------------------------------------------------------------


def check_train_config(cfg: TrainConfig) -> None:
    """Raise ``ConfigError`` naming the first invalid option. Cheap: touches no data and no model."""
    for name in ("max_steps", "batch_size", "grad_accum_steps", "checkpoint_every", "keep_last", "log_every",
                 "max_nonfinite_steps", "sample_classes"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name}={getattr(cfg, name)}: must be >= 1")
    for name in ("warmup_steps", "sample_every", "seed"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name}={getattr(cfg, name)}: must be >= 0")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise ConfigError(f"lr={cfg.lr}: must be a finite number > 0")
    if not (math.isfinite(cfg.min_lr) and 0 <= cfg.min_lr <= cfg.lr):
        raise ConfigError(f"min_lr={cfg.min_lr}: must be finite and in [0, lr={cfg.lr}]")
    for name in ("eps", "weight_decay", "grad_clip"):
        value = getattr(cfg, name)
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"{name}={value}: must be a finite number >= 0")
    if len(cfg.betas) != 2 or not all(0 <= b < 1 for b in cfg.betas):
        raise ConfigError(f"betas={tuple(cfg.betas)}: need two values in [0, 1)")
    if not 0 <= cfg.ema_decay <= 1:
        raise ConfigError(f"ema_decay={cfg.ema_decay}: must be in [0, 1]")
    if cfg.batch_size % cfg.grad_accum_steps:
        raise ConfigError(f"batch_size={cfg.batch_size} is not divisible by grad_accum_steps={cfg.grad_accum_steps}")
    if cfg.stop_at_step is not None and cfg.stop_at_step < 1:
        raise ConfigError(f"stop_at_step={cfg.stop_at_step}: must be >= 1 (or unset)")
    if cfg.mixed_precision not in ("no", "fp16", "bf16"):
        raise ConfigError(f"mixed_precision={cfg.mixed_precision!r}: choose no, fp16 or bf16")
    if cfg.mixed_precision == "fp16" and (cfg.cpu or not torch.cuda.is_available()):
        raise ConfigError("mixed_precision=fp16 needs a CUDA GPU; use --mixed-precision bf16 or no")
    if cfg.resume not in (None, "auto") and not Path(cfg.resume).exists():
        raise ConfigError(f"resume={cfg.resume}: no such checkpoint or run directory (or use --resume auto)")
    try:
        cfg.model.validate()
    except ValueError as err:
        raise ConfigError(f"model: {err}") from err
    check_sampling_options(cfg.model, cfg.sampler)


def lr_multiplier(step: int, cfg: TrainConfig) -> float:
    """LR of optimizer step ``step`` (0-based) as a fraction of ``cfg.lr``: linear warm-up over
    ``warmup_steps`` (from 1/warmup_steps to 1), then cosine to ``min_lr`` at ``max_steps`` (or constant)."""
    if cfg.lr_schedule == "constant" and step >= cfg.warmup_steps:
        return 1.0
    return warmup_cosine(step, cfg.warmup_steps, cfg.max_steps, cfg.min_lr / cfg.lr)


def warmup_cosine(step: int, warmup_steps: int, max_steps: int, floor: float) -> float:
    """Linear warm-up over ``warmup_steps`` (1/warmup_steps .. 1), then cosine from 1 to ``floor`` at
    ``max_steps``; shared by the model and tokenizer trainers."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def ema_decay_at(update: int, cfg: TrainConfig) -> float:
    """EMA decay for the ``update``-th EMA update (0-based). With warm-up it ramps as (1 + t) / (10 + t)
    (0.1, 0.18, ... 0.9 at t = 80, 0.99 at t = 890) up to ``ema_decay``, so early EMA weights follow the model
    instead of staying near the random init."""
    if not cfg.ema_warmup:
        return cfg.ema_decay
    return min(cfg.ema_decay, (1 + update) / (10 + update))


def param_groups(model: nn.Module, weight_decay: float, decay_all: bool) -> list[dict[str, Any]]:
    """AdamW groups: matrices decay; biases, norm gains (ndim < 2) and embedding tables do not,
    unless ``decay_all``. Embedding tables = ``nn.Embedding`` weights (the label table)."""
    if decay_all:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    embedding = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or id(p) in embedding else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


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


@torch.no_grad()
def fit_normalization(tokenizer: Tokenizer, dataset: Dataset, num_images: int, seed: int, batch_size: int,
                      num_workers: int, sample_posterior: bool, device: torch.device) -> tuple[float, float]:
    """Fit the tokenizer's scale/bias on the raw latents of ``num_images`` images (all when fewer),
    a seeded random subset of the training set. Uses private generators: the global RNG is untouched."""
    count = min(num_images, len(dataset))
    pick = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:count].sort().values
    loader = DataLoader(Subset(dataset, pick.tolist()), batch_size=batch_size, num_workers=num_workers,
                        generator=torch.Generator().manual_seed(seed), collate_fn=collate_skipping_bad)
    noise = torch.Generator(device).manual_seed(seed)
    yields_latents = getattr(dataset, "yields_latents", False)

    def raw_latents() -> Iterator[torch.Tensor]:
        for x, _, _ in loader:
            if x is None:  # every image of the batch was unreadable
                continue
            x = x.to(device)
            yield x if yields_latents else tokenizer.encode_raw(x, sample=sample_posterior, generator=noise)

    return tokenizer.fit_normalization(raw_latents())


@torch.no_grad()
def batch_latents(inputs: Any, tokenizer: Tokenizer, hflip: bool, sample_posterior: bool, source: str,
                  device: torch.device) -> torch.Tensor:
    """Normalized latents (N, C, h, w) of one micro-batch, with the horizontal flip and the posterior sample drawn
    from the global (checkpointed) RNG.

    ``source`` says what ``inputs`` are: ``"images"`` (N, 3, S, S) in [-1, 1], encoded here; ``"latents"``, raw
    latents (N, C, h, w); or ``"moments"``, a latent cache's dict of posterior moments of each image and of its
    flip. Images and moments draw the same random numbers in the same order (flip: one uniform per item; then the
    tokenizer's posterior noise), so a cache of float32 moments trains exactly like the images it was made from.
    """
    if source == "moments":
        batch = {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
        flip = torch.rand(batch["mean"].shape[0], device=device) < 0.5 if hflip else None  # (N,)
        mean, std = select_moments(batch, flip)  # (N, C, h, w), std None for deterministic tokenizers
        return tokenizer.normalize(tokenizer.sample_posterior(mean, std) if sample_posterior else mean)
    images = inputs.to(device, non_blocking=True)
    if hflip:
        flip = torch.rand(images.shape[0], device=device) < 0.5  # (N,)
        images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    return tokenizer.normalize(images) if source == "latents" else tokenizer.encode(images, sample=sample_posterior)


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


class StopSignals:
    """While active, SIGTERM/SIGUSR1 only set ``received``; the loop checkpoints at the next step boundary.

    Handlers can only be installed from the main thread; elsewhere this is inert.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def architecture_changes(saved: ModelConfig, current: ModelConfig) -> tuple[list[str], list[str]]:
    """``(architecture differences, objective differences)`` as "field: saved -> current" strings."""
    arch, other = [], []
    for f in dataclasses.fields(ModelConfig):
        a, b = getattr(saved, f.name), getattr(current, f.name)
        if f.name != "name" and a != b:
            (arch if f.name in ARCHITECTURE_FIELDS else other).append(f"{f.name}: {a} -> {b}")
    return arch, other


def make_accelerator(cpu: bool, mixed_precision: str) -> Accelerator:
    """The run's ``Accelerator``. Accelerate keeps one state per process and refuses a second run with another
    precision or device in it; a single process (the demo, a notebook, tests) gets that state reset instead.
    A launched multi-process run has one setting, so there the refusal stands."""
    try:
        return Accelerator(cpu=cpu, mixed_precision=mixed_precision)
    except ValueError as err:
        if "already been initialized" not in str(err) or PartialState().num_processes > 1:
            raise
        AcceleratorState._reset_state(reset_partial_state=True)
        return Accelerator(cpu=cpu, mixed_precision=mixed_precision)


def save_checkpoint(accelerator: Accelerator, cfg: TrainConfig, step: int, model: nn.Module, ema: nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                    tokenizer_info: dict[str, Any], state: dict[str, Any], names: list[str]) -> Path:
    """Write the checkpoint of ``step`` from every process, mark it complete, prune old ones.

    Weights are checked on every process first (they are identical across processes), so
    non-finite weights raise ``TrainingDiverged`` everywhere and nothing is written.
    """
    model_state, ema_state = model.state_dict(), ema.state_dict()
    try:
        ckpt_io.check_finite(model_state, "model")
        ckpt_io.check_finite(ema_state, "EMA")
    except ckpt_io.NonFiniteWeightsError as err:
        raise TrainingDiverged(f"step {step}: {err}; the last complete checkpoint is intact. Lower --lr "
                               f"or check the data") from err
    path = ckpt_io.checkpoint_dir(cfg.output_dir, step)
    if accelerator.is_main_process:
        ckpt_io.begin_checkpoint(path)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
        ckpt_io.write_main_files(
            path, model=model_state, ema=ema_state,
            config={"train": to_dict(cfg), "class_names": names},
            tokenizer=tokenizer_info, state=state, optimizer=optimizer.state_dict(),
            schedule={"scheduler": scheduler.state_dict(), "scaler": scaler},
        )
    ckpt_io.write_rng(path, accelerator.process_index)
    accelerator.wait_for_everyone()  # every file, RNG of all processes included, is on disk
    if accelerator.is_main_process:
        ckpt_io.mark_complete(path, step, accelerator.num_processes)
        for old in ckpt_io.prune_checkpoints(cfg.output_dir, cfg.keep_last):
            log.info("deleted old checkpoint %s", old)
        log.info("saved checkpoint %s", path)
    accelerator.wait_for_everyone()
    return path


# ---------------------------------------------------------------------------------------------
# The training function
# ---------------------------------------------------------------------------------------------


def train(cfg: TrainConfig, dataset: Dataset | None = None, tokenizer: Tokenizer | None = None) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.data`` (or ``dataset``) through ``cfg.tokenizer`` (or ``tokenizer``).

    ``dataset`` items are ``(image (3, S, S) in [-1, 1], label)`` (or a ``BadImage`` record for an
    unreadable file: skipped, logged and counted; more than ``data.max_bad_fraction`` of them stops the
    run), raw latents of ``tokenizer`` when the dataset has ``yields_latents = True``, or posterior
    moments when it has ``yields_moments = True`` (a latent cache, which must come from ``tokenizer``
    at ``data.image_size``; its normalization stats are used). It should have ``num_classes`` or
    ``classes`` unless ``cfg.data.num_classes`` is set. The model config's ``in_channels``,
    ``input_size`` and ``num_classes`` are set from the tokenizer and the data.

    Raises ``ConfigError`` for invalid options (before any data or model work) and
    ``TrainingDiverged`` when training cannot go on; returns a ``TrainResult`` otherwise
    (``interrupted`` when SIGTERM/SIGUSR1 stopped it after a checkpoint).
    """
    # Validate: options fail here, before any data or model work ----------------------------
    check_train_config(cfg)
    if dataset is None:
        check_data_config(cfg.data)
    if tokenizer is None:
        tokenizer = build_tokenizer(cfg.tokenizer)
    try:
        latent_c, latent_h, _ = tokenizer.latent_shape(cfg.data.image_size)
    except ValueError as err:
        raise ConfigError(f"data.image_size: {err}") from err
    if cfg.resume is None and any(e.problem is None for e in ckpt_io.list_checkpoints(cfg.output_dir)):
        # A fresh run here would interleave its checkpoints with the old run's (and prune the wrong ones).
        raise ConfigError(f"output_dir={cfg.output_dir} already holds checkpoints of a run; pass --resume auto to "
                          "continue it, or choose another --output-dir")
    accelerator = make_accelerator(cfg.cpu or not torch.cuda.is_available(), cfg.mixed_precision)
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    if cfg.batch_size % (world * cfg.grad_accum_steps):
        raise ConfigError(f"batch_size={cfg.batch_size} is not divisible by processes ({world}) x "
                          f"grad_accum_steps ({cfg.grad_accum_steps})")
    micro_batch = cfg.batch_size // (world * cfg.grad_accum_steps)  # images per process per micro-step
    is_main = accelerator.is_main_process

    # Setup -------------------------------------------------------------------------------------
    run_dir = Path(cfg.output_dir)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    file_log = logging.FileHandler(run_dir / "train.log") if is_main else None
    package_log = logging.getLogger("latentlm")
    previous_level = package_log.level
    if file_log is not None:
        file_log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        package_log.addHandler(file_log)
        if previous_level == logging.NOTSET:
            package_log.setLevel(logging.INFO)  # train.log gets the INFO lines even when nobody configured logging
    if device.type == "cuda" and cfg.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True  # ~free speed on Ampere+; bf16/fp16 runs are unaffected
        torch.backends.cudnn.allow_tf32 = True
    writer = None
    try:
        # Resume: every process reads the same directory, so all pick the same checkpoint
        report = log.warning if is_main else (lambda *args: None)
        resume_from = None
        if cfg.resume == "auto":
            resume_from = ckpt_io.latest_checkpoint(run_dir, report=report)
            if resume_from is None and is_main:
                log.info("resume=auto: no complete checkpoint under %s; starting fresh", run_dir)
        elif cfg.resume is not None:
            try:
                resume_from = ckpt_io.resolve_checkpoint(cfg.resume)
            except (FileNotFoundError, ValueError) as err:
                raise ConfigError(f"resume={cfg.resume}: {err}") from err
        saved = ckpt_io.load_checkpoint(resume_from) if resume_from is not None else None
        if saved is not None and is_main:
            log.info("resuming from %s (step %d)", saved.path, saved.step)

        # Data ----------------------------------------------------------------------------------
        if dataset is None:
            dataset = build_dataset(cfg.data)
        num_classes = cfg.data.num_classes or dataset_num_classes(dataset)
        if num_classes is None:
            raise ConfigError("the dataset does not say how many classes it has; set --data.num-classes")
        names = class_names(dataset, num_classes)
        yields_latents = getattr(dataset, "yields_latents", False)
        yields_moments = getattr(dataset, "yields_moments", False)
        source = "moments" if yields_moments else "latents" if yields_latents else "images"
        if yields_moments:
            dataset.check_run(tokenizer, cfg.tokenizer.path, cfg.data.image_size)  # same tokenizer and resolution

        # Tokenizer normalization: fitted once over many latents, then always read from checkpoints
        tokenizer.to(device).eval().requires_grad_(False)
        if saved is not None:
            if saved.tokenizer["fingerprint"] != tokenizer.fingerprint():
                raise ConfigError(f"the tokenizer ({tokenizer.kind}, {cfg.tokenizer.path}) is not the one "
                                  f"{saved.path} was trained with ({saved.tokenizer['kind']}, "
                                  f"{saved.tokenizer['source']}); pass that tokenizer")
            tokenizer.set_normalization(saved.tokenizer["scale"], saved.tokenizer["bias"])
        elif yields_moments:  # fitted when the cache was written, on samples or on the mode as this run trains
            cached_stats = dataset.normalization(cfg.tokenizer.sample_posterior)
            tokenizer.set_normalization(*cached_stats)
            if is_main:
                log.info("latent normalization from the cache: scale %.6g, bias %.6g", *cached_stats)
        elif cfg.tokenizer.norm_images > 0:
            stats = [None]
            if is_main:
                stats[0] = fit_normalization(tokenizer, dataset, cfg.tokenizer.norm_images, cfg.seed, micro_batch,
                                             cfg.data.num_workers, cfg.tokenizer.sample_posterior, device)
                log.info("latent normalization over %d images: scale %.6g, bias %.6g",
                         min(cfg.tokenizer.norm_images, len(dataset)), *stats[0])
            if world > 1:
                broadcast_object_list(stats)
            tokenizer.set_normalization(*stats[0])
        tokenizer_info = tokenizer_record(tokenizer, cfg.tokenizer.path)

        # Model, EMA, optimizer, LR schedule ------------------------------------------------------
        model_cfg = dataclasses.replace(cfg.model, in_channels=latent_c, input_size=latent_h, num_classes=num_classes)
        try:
            model_cfg.validate()
        except ValueError as err:
            raise ConfigError(f"model: {err}") from err
        cfg = dataclasses.replace(cfg, model=model_cfg)  # the resolved config is what checkpoints store
        torch.manual_seed(cfg.seed)  # identical initial weights on every process
        model = model_from_config(model_cfg).to(device)
        ema = copy.deepcopy(model).eval().requires_grad_(False)
        optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay, cfg.decay_all_params), lr=cfg.lr,
                                      betas=tuple(cfg.betas), eps=cfg.eps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, cfg))
        step, losses, nonfinite_total, nonfinite_run, data_position = 0, [], 0, 0, 0
        bad_total, drawn_total = 0, 0  # unreadable images and all images drawn, all processes
        if saved is not None:
            arch, other = architecture_changes(from_dict(ModelConfig, saved.config["train"]["model"]), model_cfg)
            if arch and not cfg.allow_arch_change:
                raise ConfigError(f"{saved.path} has a different architecture ({'; '.join(arch)}); resume with the "
                                  "original model options or pass --allow-arch-change")
            if arch or other:
                log.warning("resuming with changed model options: %s", "; ".join(arch + other))
            model.load_state_dict(saved.model)
            ema.load_state_dict(saved.ema)
            settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
            optimizer.load_state_dict(saved.optimizer)
            scheduler.load_state_dict(saved.schedule["scheduler"])
            step, losses = saved.step, list(saved.state["losses"])
            # Moments come from the checkpoint, settings (LR, betas, eps, weight decay) from this config; with an
            # unchanged config both agree bit for bit.
            for group, fresh in zip(optimizer.param_groups, settings, strict=True):
                changed = [f"{k}: {group[k]} -> {v}" for k, v in fresh.items() if k not in ("lr", "initial_lr")
                           and group.get(k) != v]
                if changed and is_main:
                    log.warning("optimizer settings changed on resume: %s", "; ".join(changed))
                group.update(fresh, lr=cfg.lr * lr_multiplier(step, cfg))
            scheduler.base_lrs = [cfg.lr] * len(optimizer.param_groups)
            nonfinite_total, nonfinite_run = saved.state["nonfinite_total"], saved.state["nonfinite_consecutive"]
            data_position = saved.state["data_position"]
            bad_total, drawn_total = saved.state.get("bad_images", 0), saved.state.get("images_drawn", 0)
            if saved.state["global_micro_batch"] != micro_batch * world:
                data_position = data_position * saved.state["global_micro_batch"] // (micro_batch * world)
                log.warning("micro-batch size x processes changed (%d -> %d): the data order continues "
                            "approximately, not exactly", saved.state["global_micro_batch"], micro_batch * world)
        model, optimizer = accelerator.prepare(model, optimizer)
        raw_model = accelerator.unwrap_model(model)
        if saved is not None and accelerator.scaler is not None and saved.schedule.get("scaler"):
            accelerator.scaler.load_state_dict(saved.schedule["scaler"])
        n_params = sum(p.numel() for p in raw_model.parameters())
        if is_main:
            log.info("%s (%s): %.2fM parameters; latents %s; %d classes; %d images; %d process(es), micro-batch %d, "
                     "%d accumulation step(s), global batch %d; device %s, precision %s", model_cfg.name,
                     model_cfg.family, n_params / 1e6, (latent_c, latent_h, latent_h), num_classes, len(dataset), world,
                     micro_batch, cfg.grad_accum_steps, cfg.batch_size, device, cfg.mixed_precision)

        # RNG: restored per process on resume; else a distinct stream per process (own noise, own dropout)
        rng = ckpt_io.load_rng(saved.path, rank) if saved is not None else None
        if rng is not None:
            ckpt_io.set_rng_state(rng)
        else:
            if saved is not None:
                log.warning("process %d has no RNG state in %s (more processes than before): reseeding", rank,
                            saved.path)
            torch.manual_seed(cfg.seed * 1000 + rank + 1 + step)
        sampler = ShardedBatchSampler(len(dataset), micro_batch, rank, world, cfg.seed, start=data_position)
        loader = DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.data.num_workers,
                            collate_fn=collate_skipping_bad,  # (inputs, labels, unreadable-image records)
                            pin_memory=device.type == "cuda", persistent_workers=cfg.data.num_workers > 0,
                            generator=torch.Generator().manual_seed(cfg.seed))  # keeps the global RNG untouched
        batches = iter(loader)
        seen_bad: dict[str, BadImage] = {}  # unreadable files this process has logged (each once)
        grid_classes = sorted({round(i * (num_classes - 1) / max(1, cfg.sample_classes - 1))
                               for i in range(min(cfg.sample_classes, num_classes))})
        if is_main and cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=step + 1)
        end_step = min(cfg.max_steps, cfg.stop_at_step or cfg.max_steps)
        last_checkpoint = saved.path if saved is not None else None
        interrupted = False

        # Loop --------------------------------------------------------------------------------------
        model.train()  # important: enables label dropout, which trains the null class for CFG
        bar = tqdm(total=end_step, initial=min(step, end_step), disable=not (cfg.progress and is_main),
                   dynamic_ncols=True, desc="train")
        window_start, window_steps, window_overhead = time.perf_counter(), 0, 0.0  # images/s excludes overhead
        console = logging_redirect_tqdm() if not bar.disable else contextlib.nullcontext()  # log lines above the bar
        with StopSignals() as stop, console:
            while step < end_step:
                # Forward/backward over the micro-batches of one step; gradients sync on the last only
                loss_sum = torch.zeros((), device=device)
                used_micro, step_bad = 0, 0  # micro-batches with a readable image; unreadable images skipped
                for micro in range(cfg.grad_accum_steps):
                    inputs, labels, bad = next(batches)  # unreadable images are left out of inputs and labels
                    data_position += 1
                    step_bad += len(bad)
                    for record in bad:
                        if record.path not in seen_bad:
                            seen_bad[record.path] = record
                            log.warning("skipped unreadable image %s: %s", record.path, record.reason)
                    if labels is None:
                        # No readable image in this micro-batch. The other processes wait for this one's gradients,
                        # so it still runs forward/backward, on zeros with zero weight: the weights do not change.
                        latents = torch.zeros((1, latent_c, latent_h, latent_h), device=device)
                        labels = torch.zeros(1, dtype=torch.long, device=device)
                    else:
                        used_micro += 1
                        labels = labels.to(device, non_blocking=True)
                        latents = batch_latents(inputs, tokenizer, cfg.data.hflip, cfg.tokenizer.sample_posterior,
                                                source, device)
                    sync = micro == cfg.grad_accum_steps - 1
                    with accelerator.no_sync(model) if not sync else contextlib.nullcontext():
                        loss = model(latents, labels)  # scalar: the model owns its diffusion loss
                        if inputs is None:
                            loss = loss * 0.0
                        accelerator.backward(loss / cfg.grad_accum_steps)
                    loss_sum += loss.detach().float()
                # One collective: mean loss over processes, whether any process got a stop signal, unreadable images
                flags = torch.stack([loss_sum / max(used_micro, 1),
                                     torch.tensor(float(stop.received is not None), device=device),
                                     torch.tensor(float(step_bad), device=device)])
                gathered = accelerator.gather(flags[None]) if world > 1 else flags[None]  # (world, 3)
                step_loss = gathered[:, 0].mean()
                stop_requested = bool(gathered[:, 1].max() > 0)
                bad_total += int(gathered[:, 2].sum().item())
                drawn_total += cfg.batch_size
                # Within the first epoch bad_total counts distinct files, so compare with the dataset size there
                check_bad_fraction(bad_total, max(drawn_total, len(dataset)), cfg.data.max_bad_fraction,
                                   list(seen_bad.values()), where=f"step {step + 1}: ")
                grad_norm = accelerator.clip_grad_norm_(model.parameters(),
                                                        cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
                finite = bool(torch.isfinite(step_loss) & torch.isfinite(grad_norm))
                # Update: a non-finite step leaves weights, EMA and optimizer state untouched. Under fp16 the
                # GradScaler must still see the step (it skips it itself and lowers its scale).
                if finite or accelerator.scaler is not None:
                    optimizer.step()
                updated = finite and not accelerator.optimizer_step_was_skipped
                if updated:
                    decay = ema_decay_at(step, cfg)
                    with torch.no_grad():
                        # EMA of the fp32 master weights; lerp: e <- e + (1 - decay) (p - e)
                        torch._foreach_lerp_(list(ema.parameters()), list(raw_model.parameters()), 1 - decay)
                        for e, b in zip(ema.buffers(), raw_model.buffers(), strict=True):
                            e.copy_(b)
                optimizer.zero_grad(set_to_none=True)
                with warnings.catch_warnings():
                    # The schedule is a function of the step, skipped updates included: torch's warning about
                    # stepping it without an optimizer step does not apply.
                    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
                    scheduler.step()
                step += 1
                window_steps += 1
                losses.append(step_loss.item())
                bar.update(1)
                if updated:
                    nonfinite_run = 0
                else:
                    nonfinite_total += 1
                    nonfinite_run += 1
                    report("step %d: non-finite loss (%s) or gradient norm (%s); update skipped (%d in a row, "
                           "%d in total)", step, f"{step_loss.item():.4g}", f"{grad_norm.item():.4g}",
                           nonfinite_run, nonfinite_total)
                    if nonfinite_run >= cfg.max_nonfinite_steps:
                        raise TrainingDiverged(
                            f"stopped at step {step}: {nonfinite_run} consecutive steps had non-finite loss or "
                            f"gradients (max_nonfinite_steps={cfg.max_nonfinite_steps}); nothing was checkpointed "
                            f"after them (last checkpoint: {last_checkpoint}). Lower --lr, check the data for "
                            "NaN/inf, or use --mixed-precision bf16 or no")

                # Monitoring: progress bar, log line + TensorBoard, sample grid from the EMA weights
                lr_now = scheduler.get_last_lr()[0]
                if step % cfg.log_every == 0 or step == end_step:
                    elapsed = time.perf_counter() - window_start - window_overhead
                    images_per_s = window_steps * cfg.batch_size / max(elapsed, 1e-9)
                    recent = [v for v in losses[-window_steps:] if math.isfinite(v)]
                    mean_loss = sum(recent) / len(recent) if recent else math.nan
                    bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr_now:.2e}", img_s=f"{images_per_s:.1f}")
                    if is_main:
                        log.info("step %d/%d loss %.4f lr %.3e grad_norm %.3g images/s %.1f", step, cfg.max_steps,
                                 mean_loss, lr_now, grad_norm.item(), images_per_s)
                    if writer is not None:
                        writer.add_scalar("train/loss", mean_loss, step)
                        writer.add_scalar("train/lr", lr_now, step)
                        writer.add_scalar("train/grad_norm", grad_norm.item(), step)
                        writer.add_scalar("train/images_per_s", images_per_s, step)
                        writer.add_scalar("train/nonfinite_steps", nonfinite_total, step)
                    window_start, window_steps, window_overhead = time.perf_counter(), 0, 0.0
                overhead_start = time.perf_counter()
                if is_main and cfg.sample_every and step % cfg.sample_every == 0:
                    # fork_rng: sampling on the main process only must not shift its training RNG stream
                    try:
                        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
                                accelerator.autocast():
                            grid = generate_grid(ema, tokenizer, grid_classes, 4, cfg.sampler, cfg.seed, names)
                        (run_dir / "samples").mkdir(exist_ok=True)
                        grid.save(run_dir / "samples" / f"step-{step:08d}.png")
                    except Exception as err:  # a failed picture must not end a days-long run
                        log.warning("step %d: sample grid failed (%s: %s); training goes on", step,
                                    type(err).__name__, err)

                # Checkpoint: on schedule, at the end, and at the boundary after a stop signal
                interrupted = stop_requested and step < end_step
                if step % cfg.checkpoint_every == 0 or step == end_step or interrupted:
                    state = {"step": step, "data_position": data_position, "global_micro_batch": micro_batch * world,
                             "dataset_size": len(dataset), "world_size": world, "losses": losses,
                             "nonfinite_total": nonfinite_total, "nonfinite_consecutive": nonfinite_run,
                             "bad_images": bad_total, "images_drawn": drawn_total}
                    last_checkpoint = save_checkpoint(accelerator, cfg, step, raw_model, ema, optimizer, scheduler,
                                                      tokenizer_info, state, names)
                window_overhead += time.perf_counter() - overhead_start
                if interrupted:
                    name = signal.Signals(stop.received).name if stop.received else "a stop signal"
                    report("stopped by %s at step %d after saving %s; continue with --resume auto", name, step,
                           last_checkpoint)
                    break
        bar.close()

        # Finish --------------------------------------------------------------------------------------
        if is_main and losses:
            save_loss_curve(losses, run_dir / "loss.png")
        accelerator.wait_for_everyone()
        if step >= end_step and not interrupted and is_main:
            log.info("finished at step %d; checkpoint %s", step, last_checkpoint)
        return TrainResult(step=step, losses=losses, run_dir=run_dir, checkpoint=last_checkpoint,
                           interrupted=interrupted, nonfinite_steps=nonfinite_total, bad_images=bad_total,
                           model=raw_model, ema=ema)
    finally:
        if writer is not None:
            writer.close()
        if file_log is not None:
            package_log.removeHandler(file_log)
            package_log.setLevel(previous_level)
            file_log.close()

