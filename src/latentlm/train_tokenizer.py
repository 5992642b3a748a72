"""``latentlm train-tokenizer``: train a σ-VAE (reconstruction + prior on μ) on Accelerate.

The reference code never released how its σ-VAE was trained; this is our recipe: squared
reconstruction error of a posterior sample z = μ + s·ε (s ~ N(0, C_σ²) per image) plus
``prior_weight`` · Σμ² (sums per image over its pixel count; see ``SigmaVAE.loss``), AdamW,
linear warm-up then cosine decay, an EMA of the weights.
Perceptual and adversarial terms are not implemented yet.

Checkpoints have the same guarantees as ``latentlm train`` (they use ``latentlm.checkpoint``):
one directory per step under ``<output_dir>/checkpoints/``, every file written atomically, a
``COMPLETE`` marker last, exact resume (weights, EMA, optimizer, schedule, RNG, data position)
with ``--resume auto``. ``model.safetensors``/``ema.safetensors`` hold the σ-VAE weights,
``tokenizer.json`` its JSON config, ``config.json`` this run's ``TokenizerTrainConfig``.

At the end the EMA weights, with the latent normalization (scale = 1/std, bias = -mean of
posterior samples of up to ``norm_images`` training images) fitted, are exported to
``<output_dir>/tokenizer.safetensors`` — the self-describing file ``--tokenizer.path`` takes —
beside ``recon.png`` (test images over their reconstructions) and ``loss.png``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, Dataset

from latentlm import checkpoint as ckpt_io
from latentlm.config import ConfigError, DataConfig, MixedPrecision, to_dict
from latentlm.data import build_dataset, check_data_config
from latentlm.data.digits import DigitsDataset
from latentlm.sample import make_grid
from latentlm.tokenizers.sigma_vae import SigmaVAE, SigmaVAEConfig, checkpoint_config, save_sigma_vae
from latentlm.train import (
    ShardedBatchSampler,
    StopSignals,
    TrainingDiverged,
    fit_normalization,
    make_accelerator,
    save_loss_curve,
    warmup_cosine,
)

log = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.safetensors"


def _digits_data() -> DataConfig:
    return DataConfig(kind="digits", image_size=16, hflip=False, num_workers=0)


@dataclass
class TokenizerTrainConfig:
    """One σ-VAE training run. Defaults train the demo's conv σ-VAE on the bundled digits (minutes on a CPU)."""

    output_dir: str = "runs/sigma-vae"  # checkpoints/, tokenizer.safetensors, recon.png, loss.png, train.log
    vae: SigmaVAEConfig = field(default_factory=SigmaVAEConfig)  # architecture and C_σ (noise_std)
    data: DataConfig = field(default_factory=_digits_data)  # digits: 16x16, no flips (a flipped digit is another glyph)
    # -- objective --
    prior_weight: float = 1e-2  # weight of Σμ² against Σ(x - x̂)², the prior on the encoder mean (paper: 1e-2)
    # -- schedule and optimizer (AdamW) --
    max_steps: int = 1200  # optimizer steps; also the length of the cosine decay
    stop_at_step: int | None = None  # checkpoint and stop here without changing the LR schedule
    batch_size: int = 64  # global images per step (split over processes)
    lr: float = 3e-3  # peak LR; small conv nets on small images take a high one
    min_lr: float = 0.0  # cosine decays to this at max_steps
    warmup_steps: int = 50  # linear warm-up from lr / warmup_steps to lr
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0  # the prior term already regularizes the latents
    grad_clip: float = 1.0  # max global gradient L2 norm; 0 disables clipping
    ema_decay: float = 0.999  # EMA of the weights (exported); warm-up (1 + t) / (10 + t) for early steps
    # -- export --
    norm_images: int = 10_000  # training images whose posterior samples fit the saved scale/bias
    # -- hardware, checkpoints, monitoring --
    mixed_precision: MixedPrecision = "no"  # "bf16" on GPUs; "no" on CPU
    cpu: bool = False  # train on CPU even when a GPU is visible
    seed: int = 0
    checkpoint_every: int = 1000  # steps between checkpoints (one is always written at the end)
    keep_last: int = 2  # complete checkpoints kept
    resume: str | None = None  # "auto": newest complete checkpoint in output_dir (none: start fresh); or a path
    log_every: int = 100  # steps between log lines
    progress: bool = True  # tqdm bar


@dataclass
class TokenizerTrainResult:
    """What ``train_tokenizer`` returns."""

    step: int
    losses: list[float]  # loss of every step from step 1 (across resumes)
    run_dir: Path
    tokenizer_path: Path | None  # the exported tokenizer file (None when stopped before max_steps)
    checkpoint: Path | None  # newest complete checkpoint
    interrupted: bool  # stopped by SIGTERM/SIGUSR1 after writing `checkpoint`
    tokenizer: SigmaVAE = dataclasses.field(repr=False)  # EMA weights, normalization fitted when finished


def check_tokenizer_train_config(cfg: TokenizerTrainConfig) -> None:
    """Raise ``ConfigError`` naming the first invalid option; touches no data and no model."""
    for name in ("max_steps", "batch_size", "checkpoint_every", "keep_last", "log_every"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name}={getattr(cfg, name)}: must be >= 1")
    if cfg.warmup_steps < 0 or cfg.norm_images < 2:
        raise ConfigError(f"warmup_steps={cfg.warmup_steps} must be >= 0 and norm_images={cfg.norm_images} >= 2")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0 and 0 <= cfg.min_lr <= cfg.lr):
        raise ConfigError(f"lr={cfg.lr}, min_lr={cfg.min_lr}: need lr > 0 and 0 <= min_lr <= lr")
    for name in ("prior_weight", "weight_decay", "grad_clip"):
        if not (math.isfinite(getattr(cfg, name)) and getattr(cfg, name) >= 0):
            raise ConfigError(f"{name}={getattr(cfg, name)}: must be a finite number >= 0")
    if not 0 <= cfg.ema_decay <= 1:
        raise ConfigError(f"ema_decay={cfg.ema_decay}: must be in [0, 1]")
    if cfg.stop_at_step is not None and cfg.stop_at_step < 1:
        raise ConfigError(f"stop_at_step={cfg.stop_at_step}: must be >= 1 (or unset)")
    if cfg.resume not in (None, "auto") and not Path(cfg.resume).exists():
        raise ConfigError(f"resume={cfg.resume}: no such checkpoint or run directory (or use --resume auto)")
    try:
        cfg.vae.validate()
    except ValueError as err:
        raise ConfigError(f"vae: {err}") from err
    if cfg.data.image_size % cfg.vae.downsample:
        raise ConfigError(f"data.image_size={cfg.data.image_size} is not divisible by the σ-VAE's downsampling "
                          f"factor {cfg.vae.downsample}")
    check_data_config(cfg.data)


def _lr_multiplier(step: int, cfg: TokenizerTrainConfig) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine from 1 to ``min_lr / lr`` at ``max_steps``."""
    return warmup_cosine(step, cfg.warmup_steps, cfg.max_steps, cfg.min_lr / cfg.lr)


@torch.no_grad()
def reconstruction_grid_png(tokenizer: SigmaVAE, images: torch.Tensor, path: Path, seed: int = 0) -> None:
    """PNG of three rows: ``images`` (n, 3, S, S), their decoded posterior modes, decoded posterior samples."""
    device = next(tokenizer.parameters()).device
    x = images.to(device)
    mode = tokenizer.decode_raw(tokenizer.encode_raw(x, sample=False))  # (n, 3, S, S)
    noisy = tokenizer.decode_raw(tokenizer.encode_raw(x, generator=torch.Generator(device).manual_seed(seed)))
    grid = make_grid(torch.cat([x, mode, noisy]).clamp(-1, 1).cpu(), rows=3,
                     row_labels=["input", "recon (mode)", "recon (sample)"])
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def _test_images(cfg: TokenizerTrainConfig, dataset: Dataset, count: int = 16) -> torch.Tensor:
    """Images for ``recon.png``: the digits test split (one of each class first), else the first training items."""
    if cfg.data.kind == "digits":
        test = DigitsDataset("test", image_size=cfg.data.image_size)
        firsts = [int(torch.nonzero(test.labels == c)[0]) for c in range(test.num_classes)]
        rest = [i for i in range(len(test)) if i not in firsts]
        return test.images[(firsts + rest)[:count]]
    return torch.stack([dataset[i][0] for i in range(min(count, len(dataset)))])


def train_tokenizer(cfg: TokenizerTrainConfig, dataset: Dataset | None = None) -> TokenizerTrainResult:
    """Train a σ-VAE on ``cfg.data`` (or ``dataset`` of ``(image (3, S, S) in [-1, 1], label)``).

    Raises ``ConfigError`` for invalid options before any work. Returns a ``TokenizerTrainResult``;
    unless interrupted, ``<output_dir>/tokenizer.safetensors`` holds the EMA weights and the
    fitted normalization.
    """
    # Validate and set up -----------------------------------------------------------------------
    check_tokenizer_train_config(cfg)
    accelerator = make_accelerator(cfg.cpu or not torch.cuda.is_available(), cfg.mixed_precision)
    world, rank, device, is_main = (accelerator.num_processes, accelerator.process_index, accelerator.device,
                                    accelerator.is_main_process)
    if cfg.batch_size % world:
        raise ConfigError(f"batch_size={cfg.batch_size} is not divisible by the {world} processes")
    micro_batch = cfg.batch_size // world
    run_dir = Path(cfg.output_dir)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    file_log = logging.FileHandler(run_dir / "train.log") if is_main else None
    package_log = logging.getLogger("latentlm")
    if file_log is not None:
        file_log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        package_log.addHandler(file_log)
    try:
        report = log.warning if is_main else (lambda *args: None)
        resume_from = None
        if cfg.resume == "auto":
            resume_from = ckpt_io.latest_checkpoint(run_dir, report=report)
        elif cfg.resume is not None:
            try:
                resume_from = ckpt_io.resolve_checkpoint(cfg.resume)
            except (FileNotFoundError, ValueError) as err:
                raise ConfigError(f"resume={cfg.resume}: {err}") from err
        saved = ckpt_io.load_checkpoint(resume_from) if resume_from is not None else None

        # Data --------------------------------------------------------------------------------------
        if dataset is None:
            dataset = build_dataset(cfg.data)

        # Model, EMA, optimizer ---------------------------------------------------------------------
        torch.manual_seed(cfg.seed)  # identical initial weights on every process
        vae = SigmaVAE(cfg.vae).to(device)
        if saved is not None:
            saved_vae = {k: v for k, v in saved.tokenizer.items() if k not in ("kind", "normalization")}
            if saved_vae != vae.config_dict():
                raise ConfigError(f"{saved.path} holds a different σ-VAE ({saved_vae}); resume with its options")
            vae.load_state_dict(saved.model)
        ema = copy.deepcopy(vae).eval().requires_grad_(False)
        optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, betas=tuple(cfg.betas),
                                      weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_multiplier(s, cfg))
        step, losses, data_position = 0, [], 0
        if saved is not None:
            ema.load_state_dict(saved.ema)
            optimizer.load_state_dict(saved.optimizer)
            scheduler.load_state_dict(saved.schedule["scheduler"])
            step, losses, data_position = saved.step, list(saved.state["losses"]), saved.state["data_position"]
            log.info("resuming from %s (step %d)", saved.path, step)
        model, optimizer = accelerator.prepare(vae, optimizer)
        raw_model = accelerator.unwrap_model(model)
        log.info("σ-VAE (%s): %.2fM parameters; latents %s from %dx%d images; %d images; batch %d on %d process(es)",
                 cfg.vae.variant, sum(p.numel() for p in raw_model.parameters()) / 1e6,
                 raw_model.latent_shape(cfg.data.image_size), cfg.data.image_size, cfg.data.image_size,
                 len(dataset), cfg.batch_size, world)
        rng = ckpt_io.load_rng(saved.path, rank) if saved is not None else None
        if rng is not None:
            ckpt_io.set_rng_state(rng)
        else:
            torch.manual_seed(cfg.seed * 1000 + rank + 1 + step)  # own noise stream per process
        sampler = ShardedBatchSampler(len(dataset), micro_batch, rank, world, cfg.seed, start=data_position)
        batches = iter(DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.data.num_workers,
                                  persistent_workers=cfg.data.num_workers > 0,
                                  generator=torch.Generator().manual_seed(cfg.seed)))  # global RNG untouched
        end_step = min(cfg.max_steps, cfg.stop_at_step or cfg.max_steps)
        last_checkpoint = saved.path if saved is not None else None
        interrupted = False

        # Loop ----------------------------------------------------------------------------------------
        from tqdm.auto import tqdm

        model.train()
        bar = tqdm(total=end_step, initial=min(step, end_step), disable=not (cfg.progress and is_main),
                   dynamic_ncols=True, desc="σ-VAE")
        window_start = time.perf_counter()
        with StopSignals() as stop:
            while step < end_step:
                images, _ = next(batches)
                data_position += 1
                images = images.to(device, non_blocking=True)
                if cfg.data.hflip:
                    flip = torch.rand(images.shape[0], device=device) < 0.5  # (N,)
                    images = torch.where(flip[:, None, None, None], images.flip(-1), images)
                with accelerator.autocast():
                    loss, parts = model(images, prior_weight=cfg.prior_weight)  # forward = loss, so DDP syncs
                accelerator.backward(loss)
                if cfg.grad_clip > 0:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                decay = min(cfg.ema_decay, (1 + step) / (10 + step))
                with torch.no_grad():
                    torch._foreach_lerp_(list(ema.parameters()), list(raw_model.parameters()), 1 - decay)
                step += 1
                losses.append(float(accelerator.gather(loss.detach()[None]).mean()))
                if not math.isfinite(losses[-1]):
                    raise TrainingDiverged(f"σ-VAE loss became {losses[-1]} at step {step}; the last checkpoint "
                                           f"({last_checkpoint}) is intact. Lower --lr")
                bar.update(1)
                if step % cfg.log_every == 0 or step == end_step:
                    recon, prior = parts["recon"].item(), parts["prior"].item()
                    bar.set_postfix(recon=f"{recon:.4f}", prior=f"{prior:.3f}")
                    if is_main:
                        log.info("step %d/%d loss %.4f recon %.4f prior %.4f lr %.3e (%.1f steps/s)", step,
                                 cfg.max_steps, losses[-1], recon, prior,
                                 scheduler.get_last_lr()[0], cfg.log_every / (time.perf_counter() - window_start))
                    window_start = time.perf_counter()
                stop_requested = bool(accelerator.gather(
                    torch.tensor([float(stop.received is not None)], device=device)).max() > 0)
                interrupted = stop_requested and step < end_step
                if step % cfg.checkpoint_every == 0 or step == end_step or interrupted:
                    last_checkpoint = _save_checkpoint(accelerator, cfg, step, raw_model, ema, optimizer, scheduler,
                                                       {"step": step, "data_position": data_position,
                                                        "losses": losses})
                if interrupted:
                    name = signal.Signals(stop.received).name if stop.received else "a stop signal"
                    log.warning("stopped by %s at step %d after saving %s; continue with --resume auto", name,
                                step, last_checkpoint)
                    break
        bar.close()

        # Finish: normalization on the EMA weights, export, pictures ----------------------------------
        tokenizer_path = None
        if is_main and losses:
            save_loss_curve(losses, run_dir / "loss.png")
        if step >= cfg.max_steps and is_main:
            scale, bias = fit_normalization(ema, dataset, cfg.norm_images, cfg.seed, micro_batch, cfg.data.num_workers,
                                            sample_posterior=True, device=device)
            log.info("latent normalization: scale %.6g, bias %.6g", scale, bias)
            tokenizer_path = save_sigma_vae(ema, run_dir / TOKENIZER_FILE)
            reconstruction_grid_png(ema, _test_images(cfg, dataset), run_dir / "recon.png", seed=cfg.seed)
            log.info("σ-VAE written to %s", tokenizer_path)
        accelerator.wait_for_everyone()
        return TokenizerTrainResult(step=step, losses=losses, run_dir=run_dir, tokenizer_path=tokenizer_path,
                                    checkpoint=last_checkpoint, interrupted=interrupted, tokenizer=ema)
    finally:
        if file_log is not None:
            package_log.removeHandler(file_log)
            file_log.close()


def _save_checkpoint(accelerator: Accelerator, cfg: TokenizerTrainConfig, step: int, vae: SigmaVAE, ema: SigmaVAE,
                     optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                     state: dict) -> Path:
    """Write the checkpoint of ``step`` in the ``latentlm.checkpoint`` layout, mark it complete, prune."""
    path = ckpt_io.checkpoint_dir(cfg.output_dir, step)
    if accelerator.is_main_process:
        ckpt_io.begin_checkpoint(path)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        ckpt_io.write_main_files(path, model=vae.state_dict(), ema=ema.state_dict(),
                                 config={"train_tokenizer": to_dict(cfg)}, tokenizer=checkpoint_config(ema),
                                 state=state, optimizer=optimizer.state_dict(),
                                 schedule={"scheduler": scheduler.state_dict()})
    ckpt_io.write_rng(path, accelerator.process_index)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        ckpt_io.mark_complete(path, step, accelerator.num_processes)
        ckpt_io.prune_checkpoints(cfg.output_dir, cfg.keep_last)
        log.info("saved checkpoint %s", path)
    accelerator.wait_for_everyone()
    return path
