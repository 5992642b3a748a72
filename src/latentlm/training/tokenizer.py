"""``latentlm train-tokenizer``: train a σ-VAE (reconstruction + prior on μ) on the shared training loop.

The reference code never released how its σ-VAE was trained; this is our recipe: squared
reconstruction error of a posterior sample z = μ + s·ε (s ~ N(0, C_σ²) per image) plus
``prior_weight`` · Σμ² (sums per image over its pixel count; see ``SigmaVAE.loss``), AdamW,
linear warm-up then cosine decay, an EMA of the weights. Perceptual and adversarial terms are not
implemented.

Checkpoints have the same layout and guarantees as ``latentlm train`` (``training/loop.py``): one
directory per step under ``<output_dir>/checkpoints/``, exact resume with ``--resume auto``.
``model.safetensors``/``ema.safetensors`` hold the σ-VAE weights, ``tokenizer.json`` its tokenizer
record, ``config.json`` ``{"train_tokenizer": TokenizerTrainConfig}``.

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
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from latentlm.checkpoint import Checkpoint
from latentlm.config import ConfigError, TokenizerTrainConfig, to_dict
from latentlm.data import build_dataset, subset_batches
from latentlm.data.digits import DigitsDataset
from latentlm.distributed import Distributed
from latentlm.lock import hold as hold_lock
from latentlm.tokenizers import tokenizer_record
from latentlm.tokenizers.normalization import fit_normalization
from latentlm.tokenizers.sigma_vae import SigmaVAE, save_sigma_vae
from latentlm.training import loop
from latentlm.visualize import make_grid, save_loss_curve

log = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.safetensors"


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


def _saved_vae(saved: Checkpoint) -> dict:
    """The σ-VAE config a tokenizer-training checkpoint holds (its tokenizer record's ``config``)."""
    record = saved.tokenizer
    if "config" in record:
        return record["config"]
    return {k: v for k, v in record.items() if k not in ("kind", "normalization")}  # earlier flat layout


class TokenizerTrainer:
    """One σ-VAE run's model, EMA, optimizer and data; ``run_steps`` calls its step, monitor and save."""

    def __init__(self, cfg: TokenizerTrainConfig, dist: Distributed, dataset: Dataset | None) -> None:
        self.cfg, self.dist, self.device = cfg, dist, dist.device
        saved = loop.find_resume(cfg.resume, Path(cfg.output_dir), dist)
        self.last_checkpoint = saved.path if saved is not None else None
        self.dataset = build_dataset(cfg.data) if dataset is None else dataset
        torch.manual_seed(cfg.seed)  # identical initial weights on every process
        vae = SigmaVAE(cfg.vae).to(dist.device)
        if saved is not None:
            if _saved_vae(saved) != vae.config_dict():
                raise ConfigError(f"{saved.path} holds a different σ-VAE ({_saved_vae(saved)}); resume with its "
                                  "options")
            vae.load_state_dict(saved.model)
            if dist.is_main:
                loop.report_resume_changes(saved, saved.config["train_tokenizer"], to_dict(cfg))
        self.ema = copy.deepcopy(vae).eval().requires_grad_(False)
        optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, betas=tuple(cfg.betas),
                                      weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: loop.warmup_cosine(s, cfg.warmup_steps, cfg.max_steps, cfg.min_lr / cfg.lr))
        self.micro_batch = cfg.batch_size // dist.world_size
        self.state = loop.TrainState(global_micro_batch=cfg.batch_size, dataset_size=len(self.dataset),
                                world_size=dist.world_size)
        if saved is not None:
            self.ema.load_state_dict(saved.ema)
            optimizer.load_state_dict(saved.optimizer)
            self.scheduler.load_state_dict(saved.schedule["scheduler"])
            old = loop.TrainState.from_dict(saved.state)
            self.state.step, self.state.data_position, self.state.losses = old.step, old.data_position, old.losses
        self.precision = loop.Precision(cfg.mixed_precision, dist.device)
        self.accelerator = loop.make_accelerator(dist.device)
        self.model, self.optimizer = self.accelerator.prepare(vae, optimizer)
        self.raw_model = self.accelerator.unwrap_model(self.model)
        log.info("σ-VAE (%s): %.2fM parameters; latents %s from %dx%d images; %d images; batch %d on %d process(es)",
                 cfg.vae.variant, sum(p.numel() for p in self.raw_model.parameters()) / 1e6,
                 self.raw_model.latent_shape(cfg.data.image_size), cfg.data.image_size, cfg.data.image_size,
                 len(self.dataset), cfg.batch_size, dist.world_size)
        loop.start_rng(saved, dist, cfg.seed, self.state.step)
        sampler = loop.ShardedBatchSampler(len(self.dataset), self.micro_batch, dist.rank, dist.world_size, cfg.seed,
                                      start=self.state.data_position)
        self.batches = iter(DataLoader(self.dataset, batch_sampler=sampler, num_workers=cfg.data.num_workers,
                                       persistent_workers=cfg.data.num_workers > 0,
                                       generator=torch.Generator().manual_seed(cfg.seed)))  # global RNG untouched
        self.window_start = time.perf_counter()

    def train_step(self, stop: loop.StopSignals) -> bool:
        cfg, state = self.cfg, self.state
        images, _ = next(self.batches)
        state.data_position += 1
        images = images.to(self.device, non_blocking=True)
        if cfg.data.hflip:
            flip = torch.rand(images.shape[0], device=self.device) < 0.5  # (N,)
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        with self.precision.autocast():
            loss, self.parts = self.model(images, prior_weight=cfg.prior_weight)  # forward = loss, so DDP syncs
        self.precision.backward(loss)
        self.precision.unscale(self.optimizer)
        if cfg.grad_clip > 0:
            self.accelerator.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.precision.step(self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        loop.update_ema(self.ema, self.raw_model, loop.ema_decay_at(state.step, cfg.ema_decay))
        state.step += 1
        state.losses.append(float(self.accelerator.gather(loss.detach()[None]).mean()))
        if not math.isfinite(state.losses[-1]):
            raise loop.TrainingDiverged(f"σ-VAE loss became {state.losses[-1]} at step {state.step}; the last "
                                        f"checkpoint ({self.last_checkpoint}) is intact. Lower --lr")
        flag = torch.tensor([float(stop.received is not None)], device=self.device)
        return bool(self.accelerator.gather(flag).max() > 0)

    def monitor(self, end_step: int) -> dict[str, str] | None:
        cfg, state = self.cfg, self.state
        if state.step % cfg.log_every and state.step != end_step:
            return None
        recon, prior = self.parts["recon"].item(), self.parts["prior"].item()
        if self.dist.is_main:
            log.info("step %d/%d loss %.4f recon %.4f prior %.4f lr %.3e (%.1f steps/s)", state.step, cfg.max_steps,
                     state.losses[-1], recon, prior, self.scheduler.get_last_lr()[0],
                     cfg.log_every / (time.perf_counter() - self.window_start))
        self.window_start = time.perf_counter()
        return {"recon": f"{recon:.4f}", "prior": f"{prior:.3f}"}

    def save(self) -> Path:
        self.last_checkpoint = loop.save_checkpoint(
            self.dist, self.cfg.output_dir, self.state.step, self.cfg.keep_last, model=self.raw_model.state_dict(),
            ema=self.ema.state_dict(), config={"train_tokenizer": to_dict(self.cfg)},
            tokenizer=tokenizer_record(self.ema, None), state=self.state.to_dict(),
            optimizer=self.optimizer.state_dict(), schedule={"scheduler": self.scheduler.state_dict()})
        return self.last_checkpoint

    def finish(self, result: loop.LoopResult) -> TokenizerTrainResult:
        """Fit the normalization on the EMA weights, export them, draw ``recon.png`` (when training finished)."""
        cfg, run_dir, tokenizer_path = self.cfg, Path(self.cfg.output_dir), None
        if self.dist.is_main and self.state.losses:
            save_loss_curve(self.state.losses, run_dir / "loss.png")
        if self.state.step >= cfg.max_steps and self.dist.is_main:
            images = subset_batches(self.dataset, cfg.norm_images, cfg.seed, self.micro_batch, cfg.data.num_workers)
            stats = fit_normalization(self.ema, images, self.device, cfg.seed, kinds=("sample",))["sample"]
            self.ema.set_normalization(stats["scale"], stats["bias"])
            log.info("latent normalization: scale %.6g, bias %.6g", stats["scale"], stats["bias"])
            tokenizer_path = save_sigma_vae(self.ema, run_dir / TOKENIZER_FILE)
            reconstruction_grid_png(self.ema, _test_images(cfg, self.dataset), run_dir / "recon.png", seed=cfg.seed)
            log.info("σ-VAE written to %s", tokenizer_path)
        self.dist.barrier()
        return TokenizerTrainResult(step=self.state.step, losses=self.state.losses, run_dir=run_dir,
                                    tokenizer_path=tokenizer_path, checkpoint=result.checkpoint,
                                    interrupted=result.interrupted, tokenizer=self.ema)


def train_tokenizer(cfg: TokenizerTrainConfig, dataset: Dataset | None = None) -> TokenizerTrainResult:
    """Train a σ-VAE on ``cfg.data`` (or ``dataset`` of ``(image (3, S, S) in [-1, 1], label)``).

    Raises ``ConfigError`` for invalid options before any work. Returns a ``TokenizerTrainResult``;
    unless interrupted, ``<output_dir>/tokenizer.safetensors`` holds the EMA weights and the
    fitted normalization.
    """
    with loop.StopSignals() as stop:  # first thing: a preemption during start-up stops the run cleanly too
        cfg.validate()
        dist = Distributed.start("cpu" if cfg.cpu or not torch.cuda.is_available() else "auto")
        if cfg.batch_size % dist.world_size:
            raise ConfigError(f"batch_size={cfg.batch_size} is not divisible by the {dist.world_size} processes")
        run_dir = Path(cfg.output_dir)
        with hold_lock(run_dir, dist), loop.run_logging(run_dir, dist):
            trainer = TokenizerTrainer(cfg, dist, dataset)
            trainer.model.train()
            end_step = min(cfg.max_steps, cfg.stop_at_step or cfg.max_steps)
            result = loop.run_steps(trainer, end_step, cfg.checkpoint_every, trainer.last_checkpoint,
                                    cfg.progress and dist.is_main, "σ-VAE", stop)
            return trainer.finish(result)
