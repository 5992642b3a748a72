"""``latentlm train``: one trainer for LatentLM and DiT with either process (DDPM or flow).

The model returns its own loss, ``model(latents, labels)``, so the same step serves both families. It
runs unchanged on a CPU, one GPU, or many GPUs and nodes under ``accelerate launch`` / ``torchrun``.
A step is one optimizer update over ``batch_size`` images (``grad_accum_steps`` micro-batches on each
of the processes); the loop, resume and checkpoint cadence are ``training/loop.py``'s.

Exit codes of ``latentlm train`` (see ``cli.py``): 0 finished (or reached ``stop_at_step``);
2 invalid option (or another process writes ``output_dir``); 3 stopped by SIGTERM/SIGUSR1/SIGINT after
writing a checkpoint or before the first step (rerun with ``--resume auto``); 4 diverged (too many
consecutive non-finite steps, or non-finite weights).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import logging
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from latentlm import checkpoint as ckpt_io
from latentlm.checkpoint import Checkpoint
from latentlm.config import ConfigError, DataConfig, ModelConfig, TokenizerConfig, TrainConfig, from_dict, to_dict
from latentlm.data import (
    BadImage,
    CachedLatents,
    build_dataset,
    check_bad_fraction,
    class_names,
    collate_skipping_bad,
    data_num_classes,
    dataset_num_classes,
    latent_source,
    read_manifest,
    subset_batches,
)
from latentlm.distributed import Distributed
from latentlm.flops import peak_tflops, training_flops
from latentlm.lock import hold as hold_lock
from latentlm.models import model_from_config
from latentlm.models.generation import check_labels
from latentlm.tokenizers import Tokenizer, build_tokenizer, tokenizer_record
from latentlm.tokenizers.normalization import fit_normalization
from latentlm.training import sharding
from latentlm.training.loop import (
    LoopResult,
    Precision,
    ShardedBatchSampler,
    StopSignals,
    TrainingDiverged,
    TrainState,
    check_fresh_run,
    ema_decay_at,
    find_resume,
    make_accelerator,
    report_resume_changes,
    reporter,
    run_logging,
    run_steps,
    save_checkpoint,
    start_rng,
    tf32_matmuls,
    update_ema,
    warmup_cosine,
)
from latentlm.visualize import sample_grid, save_loss_curve

log = logging.getLogger(__name__)


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
    train_flops: int  # counted training FLOPs (forward + backward), whole run
    # The trained weights (unwrapped, on the training device) and their EMA (what samples use); under
    # --strategy fsdp both are the sharded modules (``sharding.full_state_dict`` gathers them)
    model: nn.Module = dataclasses.field(repr=False)
    ema: nn.Module = dataclasses.field(repr=False)
    optimizer: torch.optim.Optimizer = dataclasses.field(repr=False)  # its AdamW (moments keyed like the weights)


def lr_multiplier(step: int, cfg: TrainConfig) -> float:
    """LR of optimizer step ``step`` (0-based) as a fraction of ``cfg.lr``: linear warm-up over
    ``warmup_steps`` (from 1/warmup_steps to 1), then cosine to ``min_lr`` at ``max_steps`` (or constant)."""
    if cfg.lr_schedule == "constant" and step >= cfg.warmup_steps:
        return 1.0
    return warmup_cosine(step, cfg.warmup_steps, cfg.max_steps, cfg.min_lr / cfg.lr)


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


def build_models(cfg: TrainConfig, dist: Distributed) -> tuple[nn.Module, nn.Module]:
    """The model of ``cfg.model`` and its EMA on ``dist.device``, identical on every process (seeded by
    ``cfg.seed``), with the run's activation checkpointing; under ``--strategy fsdp`` both are sharded alike
    over the processes (weights, then gradients and AdamW moments, and the EMA: 1/world each)."""
    torch.manual_seed(cfg.seed)
    model = model_from_config(cfg.model).to(dist.device)
    model.set_activation_checkpointing(cfg.activation_checkpointing)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    if cfg.strategy == "fsdp":
        model, ema = sharding.shard(model, dist, cfg.mixed_precision), sharding.shard(ema, dist, None)
    return model, ema


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over ``param_groups``: the fused CUDA kernel on GPUs (one launch for all parameters), the
    multi-tensor (foreach) implementation elsewhere."""
    fused = device.type == "cuda"
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay, cfg.decay_all_params), lr=cfg.lr,
                             betas=tuple(cfg.betas), eps=cfg.eps, fused=fused, foreach=not fused)


def done_flops(state: TrainState, flops_per_step: int) -> int:
    """Training FLOPs a checkpoint's run has counted; checkpoints written before FLOPs were counted get
    ``step x flops_per_step``."""
    return state.train_flops if state.train_flops or not state.step else state.step * flops_per_step


def budget_steps(max_flops: float, state: TrainState, flops_per_step: int) -> int:
    """The step at which a run that has counted ``state.train_flops`` by ``state.step`` reaches ``max_flops``:
    the first step whose counted FLOPs are >= the budget (at least 1 for a fresh run)."""
    remaining = max(0, math.ceil(max_flops) - state.train_flops)
    return max(state.step + -(-remaining // flops_per_step), 1)


def device_peak_tflops(cfg: TrainConfig, device: torch.device) -> float | None:
    """Per-device peak TFLOP/s for MFU: ``--peak-tflops``, else the GPU's datasheet peak, else None (CPUs)."""
    if cfg.peak_tflops is not None:
        return cfg.peak_tflops
    return peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def architecture_changes(saved: ModelConfig, current: ModelConfig) -> tuple[list[str], list[str]]:
    """``(architecture differences, objective differences)`` as "field: saved -> current" strings."""
    arch, other = [], []
    for f in dataclasses.fields(ModelConfig):
        a, b = getattr(saved, f.name), getattr(current, f.name)
        if f.name != "name" and a != b:
            (other if f.name in ModelConfig.OBJECTIVE_FIELDS else arch).append(f"{f.name}: {a} -> {b}")
    return arch, other


# ---------------------------------------------------------------------------------------------
# Setup pieces
# ---------------------------------------------------------------------------------------------


def _checked(cfg: TrainConfig, dataset: Dataset | None, tokenizer: Tokenizer | None
             ) -> tuple[TrainConfig, Tokenizer, int, int]:
    """Validate everything that can be checked before any data or model work: ``(cfg, tokenizer, C, h)``,
    ``cfg`` with a latent cache's tokenizer and image size filled in (``settings_from_cache``).

    A tokenizer passed in is copied: the run sets its normalization, the caller's object stays as it was.
    """
    cfg.validate()
    if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("mixed_precision=fp16 needs a CUDA GPU; use --mixed-precision bf16 or no")
    if dataset is None:
        cfg.data.validate()
        if cfg.data.kind == "cached":  # a complete cache, else says what to do
            cfg = settings_from_cache(cfg, read_manifest(cfg.data.path), tokenizer is None)
        checked_num_classes(cfg.data.num_classes, data_num_classes(cfg.data), cfg.data.path)
    tokenizer = build_tokenizer(cfg.tokenizer) if tokenizer is None else copy.deepcopy(tokenizer)
    try:
        latent_c, latent_h, _ = tokenizer.latent_shape(cfg.data.image_size)
    except ValueError as err:
        raise ConfigError(f"data.image_size: {err}") from err
    check_fresh_run(cfg.output_dir, cfg.resume)
    return cfg, tokenizer, latent_c, latent_h


def settings_from_cache(cfg: TrainConfig, manifest: dict[str, Any], fill_tokenizer: bool = True) -> TrainConfig:
    """``cfg`` with the latent cache's tokenizer (kind and file, or identity patch) and image size where ``cfg``
    leaves them at their defaults: the cache's plan records both. Values given that contradict the cache are
    refused later, when the cache is opened (``CachedLatents.check_run``)."""
    tokenizer, data, cached = cfg.tokenizer, cfg.data, manifest["tokenizer"]
    default = TokenizerConfig()
    if fill_tokenizer and (tokenizer.kind, tokenizer.path, tokenizer.patch) == (default.kind, None, default.patch):
        if cached["kind"] == "identity":
            tokenizer = dataclasses.replace(tokenizer, patch=int(cached["config"].get("patch", default.patch)))
        else:
            tokenizer = dataclasses.replace(tokenizer, kind=cached["kind"], path=cached["source"])
            log.info("tokenizer from the latent cache's plan: %s %s", cached["kind"], cached["source"])
    if data.image_size == DataConfig.image_size and manifest["image_size"] != data.image_size:
        data = dataclasses.replace(data, image_size=int(manifest["image_size"]))
        log.info("data.image_size %d from the latent cache's plan", data.image_size)
    return dataclasses.replace(cfg, tokenizer=tokenizer, data=data)


def _normalize(cfg: TrainConfig, tokenizer: Tokenizer, dataset: Dataset, saved: Checkpoint | None,
               dist: Distributed, micro_batch: int) -> None:
    """Set the tokenizer's latent normalization: the checkpoint's on resume, the cache's for a latent cache,
    else fitted once (first process) over ``norm_images`` images; ``norm_images = 0`` keeps the stored one."""
    tokenizer.to(dist.device).eval().requires_grad_(False)
    kind = "sample" if cfg.tokenizer.sample_posterior else "mode"
    if saved is not None:
        if saved.tokenizer["fingerprint"] != tokenizer.fingerprint():
            raise ConfigError(f"the tokenizer ({tokenizer.kind}, {cfg.tokenizer.path}) is not the one "
                              f"{saved.path} was trained with ({saved.tokenizer['kind']}, "
                              f"{saved.tokenizer['source']}); pass that tokenizer")
        tokenizer.set_normalization(saved.tokenizer["scale"], saved.tokenizer["bias"])
    elif isinstance(dataset, CachedLatents):  # fitted when the cache was written, on samples or on the mode
        stats = dataset.normalization(cfg.tokenizer.sample_posterior)
        tokenizer.set_normalization(*stats)
        if dist.is_main:
            log.info("latent normalization from the cache: scale %.6g, bias %.6g", *stats)
    elif cfg.tokenizer.norm_images > 0:
        stats = None
        if dist.is_main:
            images = subset_batches(dataset, cfg.tokenizer.norm_images, cfg.seed, micro_batch, cfg.data.num_workers)
            stats = fit_normalization(tokenizer, images, dist.device, cfg.seed, kinds=(kind,))[kind]
            log.info("latent normalization over %d images: scale %.6g, bias %.6g",
                     min(cfg.tokenizer.norm_images, len(dataset)), stats["scale"], stats["bias"])
        stats = dist.broadcast(stats)
        tokenizer.set_normalization(stats["scale"], stats["bias"])


def _check_resumable(saved: Checkpoint, cfg: TrainConfig) -> None:
    """Refuse, before any model work, a checkpoint this run cannot continue: an export (weights only), or one
    written under the other strategy (DDP checkpoints hold whole tensors, FSDP ones shards)."""
    if saved.weights_only:
        raise ConfigError(f"{saved.path} holds exported weights only (no optimizer state); resume from a checkpoint "
                          "of the run itself")
    layout = "fsdp" if saved.sharded else "ddp"
    if layout != cfg.strategy:
        raise ConfigError(f"{saved.path} was written by a --strategy {layout} run ({'' if saved.sharded else 'not '}"
                          f"sharded); resume it with --strategy {layout}")


def _restore(saved: Checkpoint, cfg: TrainConfig, model: nn.Module, ema: nn.Module,
             optimizer: torch.optim.Optimizer, scheduler: Any, state: TrainState, dist: Distributed) -> None:
    """Load weights, EMA, optimizer moments and schedule from ``saved``; ``state`` takes its counters."""
    arch, _ = architecture_changes(from_dict(ModelConfig, saved.train_config["model"]), cfg.model)
    if arch and not cfg.allow_arch_change:
        raise ConfigError(f"{saved.path} has a different architecture ({'; '.join(arch)}); resume with the "
                          "original model options or pass --allow-arch-change")
    settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    if saved.sharded:
        sharding.load(saved, model, ema, optimizer, dist)
    else:
        try:
            model.load_state_dict(saved.model)
            ema.load_state_dict(saved.ema)
        except RuntimeError as err:  # names the missing, unexpected and wrong-shape tensors
            raise ConfigError(f"{saved.path}: its weights do not fit this run's model "
                              f"({' '.join(str(err).split())[:300]}); resume with the original model options") from err
        optimizer.load_state_dict(saved.optimizer)
    scheduler.load_state_dict(saved.schedule["scheduler"])
    # Moments come from the checkpoint, settings (LR, betas, eps, weight decay) from this config; with an
    # unchanged config both agree bit for bit.
    for group, fresh in zip(optimizer.param_groups, settings, strict=True):
        changed = [f"{k}: {group[k]} -> {v}" for k, v in fresh.items() if k not in ("lr", "initial_lr")
                   and group.get(k) != v]
        if changed and dist.is_main:
            log.warning("optimizer settings changed on resume: %s", "; ".join(changed))
        group.update(fresh, lr=cfg.lr * lr_multiplier(saved.step, cfg))
    scheduler.base_lrs = [cfg.lr] * len(optimizer.param_groups)
    old = TrainState.from_dict(saved.state)
    if old.global_micro_batch != state.global_micro_batch:
        old.data_position = old.data_position * old.global_micro_batch // state.global_micro_batch
        log.warning("micro-batch size x processes changed (%d -> %d): the data order continues approximately, "
                    "not exactly", old.global_micro_batch, state.global_micro_batch)
    state.step, state.data_position, state.losses = old.step, old.data_position, list(old.losses)
    state.nonfinite_total, state.nonfinite_consecutive = old.nonfinite_total, old.nonfinite_consecutive
    state.bad_images, state.images_drawn = old.bad_images, old.images_drawn
    state.train_flops = done_flops(old, training_flops(cfg.model, cfg.batch_size))


def preview_classes(num_classes: int, wanted: int) -> list[int]:
    """The classes of the training preview grids: ``min(wanted, num_classes)`` ids spread evenly over all
    classes, first and last included (all of them when there are no more than ``wanted``)."""
    count = min(wanted, num_classes)
    return sorted({round(i * (num_classes - 1) / max(1, count - 1)) for i in range(count)})


def checked_num_classes(given: int | None, found: int | None, where: str | None) -> int:
    """The run's number of classes: ``--data.num-classes`` if given, else the data's. Fewer than the data has
    is refused (label ``given`` would be the null class of guidance, larger ones out of range); more is allowed
    (a label table for classes this data lacks, e.g. fine-tuning an ImageNet run on a subset)."""
    if given is None and found is None:
        raise ConfigError("the dataset does not say how many classes it has; set --data.num-classes")
    if given is not None and found is not None and given < found:
        raise ConfigError(f"data.num_classes={given} contradicts the data ({where or 'the dataset'}), which has "
                          f"{found} classes: labels >= {given} would be misread; leave --data.num-classes unset (or "
                          f"set it to at least {found})")
    return given if given is not None else found


# ---------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------


class ModelTrainer:
    """One run's model, EMA, optimizer, data and monitoring; ``run_steps`` calls its step, monitor and save."""

    def __init__(self, cfg: TrainConfig, dist: Distributed, dataset: Dataset | None, tokenizer: Tokenizer,
                 latent: tuple[int, int], micro_batch: int, saved: Checkpoint | None) -> None:
        self.last_checkpoint = saved.path if saved is not None else None
        # Data ----------------------------------------------------------------------------------
        dataset = build_dataset(cfg.data) if dataset is None else dataset
        num_classes = checked_num_classes(cfg.data.num_classes, dataset_num_classes(dataset), cfg.data.path)
        self.names = class_names(dataset, num_classes)
        if isinstance(dataset, CachedLatents):
            dataset.check_run(tokenizer, cfg.tokenizer.path, cfg.data.image_size)  # same tokenizer, resolution
        _normalize(cfg, tokenizer, dataset, saved, dist, micro_batch)
        self.tokenizer, self.tokenizer_info = tokenizer, tokenizer_record(tokenizer, cfg.tokenizer.path)
        self.source = latent_source(dataset, tokenizer, cfg.data.hflip, cfg.tokenizer.sample_posterior)
        # Model, EMA, optimizer, LR schedule ------------------------------------------------------
        model_cfg = dataclasses.replace(cfg.model, in_channels=latent[0], input_size=latent[1], num_classes=num_classes)
        try:
            model_cfg.validate()
        except ConfigError as err:
            raise ConfigError(f"model: {err}") from err
        self.flops_per_step = training_flops(model_cfg, cfg.batch_size)  # forward + backward, all processes
        if cfg.max_flops is not None:
            cfg = self._budgeted(cfg, saved, dist)
        self.cfg = cfg = dataclasses.replace(cfg, model=model_cfg)  # the resolved config is what checkpoints store
        if saved is not None and dist.is_main:
            report_resume_changes(saved, saved.train_config, to_dict(cfg))
        self.peak_tflops = device_peak_tflops(cfg, dist.device)
        self.dist, self.device, self.dataset_size = dist, dist.device, len(dataset)
        self.fsdp = cfg.strategy == "fsdp"
        model, self.ema = build_models(cfg, dist)
        optimizer = make_optimizer(model, cfg, dist.device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, cfg))
        self.precision = Precision(cfg.mixed_precision, dist.device)
        self.state = TrainState(global_micro_batch=micro_batch * dist.world_size, dataset_size=len(dataset),
                                world_size=dist.world_size)
        if saved is not None:
            _restore(saved, cfg, model, self.ema, optimizer, self.scheduler, self.state, dist)
            self.precision.load_state_dict(saved.schedule.get("scaler"))
        self.accelerator = make_accelerator(dist.device)
        if self.fsdp:
            self.model, self.optimizer = model, optimizer
        else:
            self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.raw_model = self.accelerator.unwrap_model(self.model)
        # The model's loss, compiled on request (the first steps compile; dynamic=False: one graph per shape)
        self.loss_fn = torch.compile(self.model, dynamic=False) if cfg.compile else self.model
        if dist.is_main:
            log.info("%s (%s): %.2fM parameters; latents %s; %d classes; %d images; %d process(es), micro-batch %d, "
                     "%d accumulation step(s), global batch %d; device %s, precision %s, strategy %s%s%s",
                     model_cfg.name, model_cfg.family, sum(p.numel() for p in model.parameters()) / 1e6,
                     (latent[0], latent[1], latent[1]), num_classes, len(dataset), dist.world_size, micro_batch,
                     cfg.grad_accum_steps, cfg.batch_size, dist.device, cfg.mixed_precision, cfg.strategy,
                     ", activation checkpointing" if cfg.activation_checkpointing else "",
                     ", compiled" if cfg.compile else "")
        # Data order, monitoring ------------------------------------------------------------------
        start_rng(saved, dist, cfg.seed, self.state.step)
        sampler = ShardedBatchSampler(len(dataset), micro_batch, dist.rank, dist.world_size, cfg.seed,
                                      start=self.state.data_position)
        self.batches = iter(DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.data.num_workers,
                                       collate_fn=collate_skipping_bad,  # (inputs, labels, unreadable records)
                                       pin_memory=dist.device.type == "cuda",
                                       persistent_workers=cfg.data.num_workers > 0,
                                       generator=torch.Generator().manual_seed(cfg.seed)))  # global RNG untouched
        self.seen_bad: dict[str, BadImage] = {}  # unreadable files this process has logged (each once)
        self.grid_classes = preview_classes(num_classes, cfg.sample_classes)
        self.writer = None
        if dist.is_main and cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(cfg.output_dir) / "tb"), purge_step=self.state.step + 1)
        self.window_start, self.window_steps, self.window_overhead = time.perf_counter(), 0, 0.0
        self.grad_norm = torch.zeros(())

    def _budgeted(self, cfg: TrainConfig, saved: Checkpoint | None, dist: Distributed) -> TrainConfig:
        """``cfg`` with ``max_steps`` set to the step where the counted FLOPs reach ``max_flops``."""
        done = TrainState.from_dict(saved.state) if saved is not None else TrainState()
        done.train_flops = done_flops(done, self.flops_per_step)
        steps = budget_steps(cfg.max_flops, done, self.flops_per_step)
        if dist.is_main:
            log.info("compute budget %.4g FLOPs: %d steps of %.4g FLOPs (%d images); max_steps %d -> %d",
                     cfg.max_flops, steps, self.flops_per_step, cfg.batch_size, cfg.max_steps, steps)
        return dataclasses.replace(cfg, max_steps=steps)

    def _micro_batches(self) -> tuple[torch.Tensor, int, int]:
        """Forward/backward over the micro-batches of one step (gradients sync on the last only):
        ``(sum of their losses, micro-batches with a readable image, unreadable images skipped)``."""
        cfg, state = self.cfg, self.state
        loss_sum = torch.zeros((), device=self.device)
        used, skipped = 0, 0
        for micro in range(cfg.grad_accum_steps):
            inputs, labels, bad = next(self.batches)  # unreadable images are left out of inputs and labels
            state.data_position += 1
            skipped += len(bad)
            for record in bad:
                if record.path not in self.seen_bad:
                    self.seen_bad[record.path] = record
                    log.warning("skipped unreadable image %s: %s", record.path, record.reason)
            if labels is None:
                # No readable image in this micro-batch. The other processes wait for this one's gradients,
                # so it still runs forward/backward, on zeros with zero weight: the weights do not change.
                c, h = self.raw_model.config.in_channels, self.raw_model.config.input_size
                latents = torch.zeros((1, c, h, h), device=self.device)
                labels = torch.zeros(1, dtype=torch.long, device=self.device)
            else:
                used += 1
                check_labels(labels, self.raw_model.config.num_classes, allow_null=False)  # on the CPU: no sync
                labels = labels.to(self.device, non_blocking=True)
                latents = self.source.latents(inputs, self.device)
            # DDP all-reduces on the last micro-batch only; FSDP reduce-scatters each one into the sharded gradients
            sync = micro == cfg.grad_accum_steps - 1 or self.fsdp
            with self.accelerator.no_sync(self.model) if not sync else contextlib.nullcontext():
                with self.precision.autocast():
                    loss = self.loss_fn(latents, labels).float()  # scalar: the model owns its diffusion loss
                if inputs is None:
                    loss = loss * 0.0
                self.precision.backward(loss / cfg.grad_accum_steps)
            loss_sum += loss.detach()
        return loss_sum, used, skipped

    def train_step(self, stop: StopSignals) -> bool:
        cfg, state = self.cfg, self.state
        loss_sum, used, skipped = self._micro_batches()
        # One collective: mean loss over processes, whether any process got a stop signal, unreadable images
        flags = torch.tensor([0.0, float(stop.received is not None), float(skipped)], device=self.device)
        flags[0] = loss_sum / max(used, 1)
        gathered = self.accelerator.gather(flags[None]) if self.dist.world_size > 1 else flags[None]  # (world, 3)
        step_loss = gathered[:, 0].mean()
        state.bad_images += int(gathered[:, 2].sum().item())
        state.images_drawn += cfg.batch_size
        # Within the first epoch bad_images counts distinct files, so compare with the dataset size there
        check_bad_fraction(state.bad_images, max(state.images_drawn, self.dataset_size), cfg.data.max_bad_fraction,
                           list(self.seen_bad.values()), where=f"step {state.step + 1}: ")
        self.precision.unscale(self.optimizer)
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        self.grad_norm = (sharding.clip_grad_norm(self.model, max_norm) if self.fsdp
                          else self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm))
        finite = bool(torch.isfinite(step_loss) & torch.isfinite(self.grad_norm))
        # Update: a non-finite step leaves weights, EMA and optimizer state untouched. Under fp16 the
        # GradScaler must still see the step (it skips it itself and lowers its scale).
        stepped = self.precision.step(self.optimizer) if finite or self.precision.scaler is not None else False
        updated = finite and stepped
        if updated:
            update_ema(self.ema, self.raw_model, ema_decay_at(state.step, cfg.ema_decay, cfg.ema_warmup))
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            # The schedule is a function of the step, skipped updates included: torch's warning about
            # stepping it without an optimizer step does not apply.
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            self.scheduler.step()
        state.step += 1
        state.train_flops += self.flops_per_step  # skipped steps did their forward and backward too
        self.window_steps += 1
        state.losses.append(step_loss.item())
        self._count_nonfinite(updated, step_loss)
        return bool(gathered[:, 1].max() > 0)

    def _count_nonfinite(self, updated: bool, step_loss: torch.Tensor) -> None:
        state, cfg = self.state, self.cfg
        if updated:
            state.nonfinite_consecutive = 0
            return
        state.nonfinite_total += 1
        state.nonfinite_consecutive += 1
        reporter(self.dist)("step %d: non-finite loss (%s) or gradient norm (%s); update skipped (%d in a row, %d in "
                            "total)", state.step, f"{step_loss.item():.4g}", f"{self.grad_norm.item():.4g}",
                            state.nonfinite_consecutive, state.nonfinite_total)
        if state.nonfinite_consecutive >= cfg.max_nonfinite_steps:
            raise TrainingDiverged(
                f"stopped at step {state.step}: {state.nonfinite_consecutive} consecutive steps had non-finite loss "
                f"or gradients (max_nonfinite_steps={cfg.max_nonfinite_steps}); nothing was checkpointed after "
                f"them (last checkpoint: {self.last_checkpoint}). Lower --lr, check the data for NaN/inf, or use "
                "--mixed-precision bf16 or no")

    def monitor(self, end_step: int) -> dict[str, str] | None:
        """Log line + TensorBoard every ``log_every`` steps; a sample grid from the EMA every ``sample_every``."""
        cfg, state = self.cfg, self.state
        postfix = None
        if state.step % cfg.log_every == 0 or state.step == end_step:
            lr_now = self.scheduler.get_last_lr()[0]
            elapsed = time.perf_counter() - self.window_start - self.window_overhead
            images_per_s = self.window_steps * cfg.batch_size / max(elapsed, 1e-9)  # sampling/saving excluded
            recent = [v for v in state.losses[-self.window_steps:] if math.isfinite(v)]
            mean_loss = sum(recent) / len(recent) if recent else math.nan
            tflops = self.window_steps * self.flops_per_step / max(elapsed, 1e-9) / 1e12  # all processes
            mfu = tflops / (self.peak_tflops * self.dist.world_size) if self.peak_tflops else None
            postfix = {"loss": f"{mean_loss:.4f}", "lr": f"{lr_now:.2e}", "img_s": f"{images_per_s:.1f}"}
            if mfu is not None:
                postfix["mfu"] = f"{mfu:.1%}"
            if self.dist.is_main:
                log.info("step %d/%d loss %.4f lr %.3e grad_norm %.3g images/s %.1f TFLOP/s %.4g%s FLOPs %.4g",
                         state.step, cfg.max_steps, mean_loss, lr_now, self.grad_norm.item(), images_per_s, tflops,
                         "" if mfu is None else f" MFU {mfu:.1%}", state.train_flops)
            if self.writer is not None:
                scalars = [("loss", mean_loss), ("lr", lr_now), ("grad_norm", self.grad_norm.item()),
                           ("images_per_s", images_per_s), ("nonfinite_steps", state.nonfinite_total),
                           ("flops", float(state.train_flops)), ("tflops_per_s", tflops)]
                for name, value in scalars + ([("mfu", mfu)] if mfu is not None else []):
                    self.writer.add_scalar(f"train/{name}", value, state.step)
            self.window_start, self.window_steps, self.window_overhead = time.perf_counter(), 0, 0.0
        if cfg.sample_every and state.step % cfg.sample_every == 0 and (self.dist.is_main or self.fsdp):
            started = time.perf_counter()
            self._sample_grid()
            self.window_overhead += time.perf_counter() - started
        return postfix

    def _grid_model(self) -> nn.Module | None:
        """What the grids sample from on the first process: the EMA, gathered whole when it is sharded (every
        process takes part in the gather; the others get None)."""
        if not self.fsdp:
            return self.ema
        state = sharding.full_state_dict(self.ema)
        if not self.dist.is_main:
            return None
        with torch.device("meta"):
            ema = model_from_config(self.raw_model.config)
        ema.load_state_dict(state, assign=True)
        return ema.to(self.device).eval()

    def _sample_grid(self) -> None:
        ema = self._grid_model()
        if ema is None:
            return
        # fork_rng: sampling on the main process only must not shift its training RNG stream
        try:
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []), \
                    self.precision.autocast():
                grid = sample_grid(ema, self.tokenizer, self.grid_classes, 4, self.cfg.sampler, self.cfg.seed,
                                   self.names)
            samples = Path(self.cfg.output_dir) / "samples"
            samples.mkdir(exist_ok=True)
            grid.save(samples / f"step-{self.state.step:08d}.png")
        except Exception as err:  # a failed picture must not end a days-long run
            log.warning("step %d: sample grid failed (%s: %s); training goes on", self.state.step,
                        type(err).__name__, err)

    def save(self) -> Path:
        """The checkpoint of this step. Weights are checked on every process first (they are identical across
        processes), so non-finite weights raise ``TrainingDiverged`` everywhere and nothing is written."""
        started = time.perf_counter()
        model_state = ema_state = optimizer_state = write_shards = None
        try:
            if self.fsdp:  # weights, EMA and optimizer go to sharded/ from every process
                sharding.check_finite(model=self.raw_model, EMA=self.ema)
                write_shards = functools.partial(sharding.save, model=self.raw_model, ema=self.ema,
                                                 optimizer=self.optimizer)
            else:
                model_state, ema_state = self.raw_model.state_dict(), self.ema.state_dict()
                optimizer_state = self.optimizer.state_dict()
                ckpt_io.check_finite(model_state, "model")
                ckpt_io.check_finite(ema_state, "EMA")
        except ckpt_io.NonFiniteWeightsError as err:
            raise TrainingDiverged(f"step {self.state.step}: {err}; the last complete checkpoint is intact. Lower "
                                   "--lr or check the data") from err
        self.last_checkpoint = save_checkpoint(
            self.dist, self.cfg.output_dir, self.state.step, self.cfg.keep_last, write_shards=write_shards,
            model=model_state, ema=ema_state, config={"train": to_dict(self.cfg), "class_names": self.names},
            tokenizer=self.tokenizer_info, state=self.state.to_dict(), optimizer=optimizer_state,
            schedule={"scheduler": self.scheduler.state_dict(), "scaler": self.precision.state_dict()})
        self.window_overhead += time.perf_counter() - started
        return self.last_checkpoint

    def finish(self, result: LoopResult, end_step: int) -> TrainResult:
        state, run_dir = self.state, Path(self.cfg.output_dir)
        if self.dist.is_main and state.losses:
            save_loss_curve(state.losses, run_dir / "loss.png")
        self.dist.barrier()
        if state.step >= end_step and not result.interrupted and self.dist.is_main:
            log.info("finished at step %d (%.4g training FLOPs counted); checkpoint %s", state.step,
                     state.train_flops, result.checkpoint)
        return TrainResult(step=state.step, losses=state.losses, run_dir=run_dir, checkpoint=result.checkpoint,
                           interrupted=result.interrupted, nonfinite_steps=state.nonfinite_total,
                           bad_images=state.bad_images, train_flops=state.train_flops, model=self.raw_model,
                           ema=self.ema, optimizer=getattr(self.optimizer, "optimizer", self.optimizer))  # unwrapped

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def train(cfg: TrainConfig, dataset: Dataset | None = None, tokenizer: Tokenizer | None = None) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.data`` (or ``dataset``) through ``cfg.tokenizer`` (or ``tokenizer``).

    ``dataset`` items are ``(image (3, S, S) in [-1, 1], label)`` (or a ``BadImage`` record for an
    unreadable file: skipped, logged and counted; more than ``data.max_bad_fraction`` of them stops the
    run), or a ``CachedLatents`` (which must come from ``tokenizer`` at ``data.image_size``; its
    normalization stats are used). It should have ``num_classes`` or ``classes`` unless
    ``cfg.data.num_classes`` is set. The model config's ``in_channels``, ``input_size`` and
    ``num_classes`` are set from the tokenizer and the data.

    Raises ``ConfigError`` for invalid options (before any data or model work; also when another process
    is writing ``output_dir``: ``latentlm.lock``) and ``TrainingDiverged`` when training cannot go on;
    returns a ``TrainResult`` otherwise (``interrupted`` when SIGTERM/SIGUSR1/SIGINT stopped it after a
    checkpoint). Such a signal before the first step raises ``latentlm.signals.StopRequested``.
    """
    with StopSignals() as stop:  # first thing: a preemption during start-up stops the run cleanly too
        # Validate: options fail here, before any data or model work ----------------------------
        cfg, tokenizer, latent_c, latent_h = _checked(cfg, dataset, tokenizer)
        dist = Distributed.start("cpu" if cfg.cpu or not torch.cuda.is_available() else "auto")
        if cfg.batch_size % (dist.world_size * cfg.grad_accum_steps):
            raise ConfigError(f"batch_size={cfg.batch_size} is not divisible by processes ({dist.world_size}) x "
                              f"grad_accum_steps ({cfg.grad_accum_steps})")
        micro_batch = cfg.batch_size // (dist.world_size * cfg.grad_accum_steps)  # images per process per micro-step
        run_dir = Path(cfg.output_dir)

        # Setup, loop, finish: one writer per run directory ----------------------------------------
        with hold_lock(run_dir, dist):
            saved = find_resume(cfg.resume, run_dir, dist)
            if saved is not None:
                _check_resumable(saved, cfg)
                if not saved.sharded:  # every file read now: a damaged checkpoint is refused before any is written
                    _ = saved.model, saved.ema, saved.optimizer, saved.schedule
            with run_logging(run_dir, dist), tf32_matmuls(dist.device.type == "cuda" and cfg.allow_tf32):
                trainer = ModelTrainer(cfg, dist, dataset, tokenizer, (latent_c, latent_h), micro_batch, saved)
                cfg = trainer.cfg  # resolved: max_steps follows max_flops when that is set
                end_step = min(cfg.max_steps, cfg.stop_at_step or cfg.max_steps)
                try:
                    trainer.model.train()  # important: enables label dropout, which trains the null class for CFG
                    result = run_steps(trainer, end_step, cfg.checkpoint_every, trainer.last_checkpoint,
                                       cfg.progress and dist.is_main, "train", stop)
                finally:
                    trainer.close()
                return trainer.finish(result, end_step)
