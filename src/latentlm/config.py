"""Every configuration dataclass of latentlm, one per concern, each with ``validate()``.

Every dataclass here is plain data: it round-trips through ``to_dict`` / ``from_dict`` (JSON) and is
saved with every checkpoint, so a run can always be rebuilt from its own directory. The command
line is generated from these classes (``latentlm.cli``), so a field's comment is its ``--help`` text.

``validate()`` checks values only: it is cheap, touches no file contents, no data and no model, and
raises ``ConfigError`` naming the option, the value and what is allowed. This module imports
nothing heavy (no torch), so ``latentlm --help`` stays fast.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


class ConfigError(ValueError):
    """An invalid option, found before any data or model work; the CLI prints it and exits with code 2."""


def _at_least(cfg: Any, minimum: int, *names: str, prefix: str = "") -> None:
    """Raise ``ConfigError`` for the first field of ``names`` below ``minimum``."""
    for name in names:
        value = getattr(cfg, name)
        if value < minimum:
            raise ConfigError(f"{prefix}{name}={value}: must be >= {minimum}")


def _choice(value: Any, allowed: tuple[Any, ...], name: str) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r}: choose one of {', '.join(map(str, allowed))}")


# ---------------------------------------------------------------------------------------------
# Diffusion / flow process (what the model is trained to predict)
# ---------------------------------------------------------------------------------------------

ProcessKind = Literal["ddpm", "flow"]
BetaSchedule = Literal["linear", "cosine"]
PredictionType = Literal["epsilon", "v_prediction"]
TimestepSampling = Literal["uniform", "min_snr", "logit_normal"]
LINEAR_BETA_END = 0.02  # the linear schedule's last beta at T = 1000 (DDPM's 1e-4 -> 0.02)
# Which timestep distributions each process draws from.
TIMESTEP_SAMPLING = {"ddpm": ("uniform", "min_snr"), "flow": ("uniform", "logit_normal")}


@dataclass
class ProcessConfig:
    """The training process of the diffusion head (LatentLM) or the whole grid (DiT)."""

    kind: ProcessKind = "ddpm"  # "ddpm": discrete VP diffusion; "flow": rectified flow x_t = (1-t) x0 + t eps
    beta_schedule: BetaSchedule = "cosine"  # ddpm only; the paper's tokenizer analysis uses cosine
    prediction_type: PredictionType = "v_prediction"  # ddpm only; flow always predicts v = eps - x0
    num_train_timesteps: int = 1000  # ddpm: T; flow: the model sees t * num_train_timesteps
    # "uniform": t ~ U; "min_snr": ddpm t drawn with probability ∝ the min-SNR-γ loss weight
    # (importance sampling instead of loss weighting); "logit_normal": flow t = sigmoid(N(m, s)).
    timestep_sampling: TimestepSampling = "uniform"
    min_snr_gamma: float = 5.0  # γ of min-SNR-γ (Hang et al. 2023)
    logit_normal_mean: float = 0.0  # m of the logit-normal t distribution (flow)
    logit_normal_std: float = 1.0  # s of the logit-normal t distribution (flow)

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the bad field and what is allowed."""
        _choice(self.kind, ("ddpm", "flow"), "ProcessConfig.kind")
        if self.kind == "ddpm":
            _choice(self.beta_schedule, ("linear", "cosine"), "beta_schedule")
            _choice(self.prediction_type, ("epsilon", "v_prediction"), "prediction_type")
        if self.timestep_sampling not in TIMESTEP_SAMPLING[self.kind]:
            raise ConfigError(f"timestep_sampling={self.timestep_sampling!r}: {self.kind} process allows "
                              f"{TIMESTEP_SAMPLING[self.kind]}")
        minimum = 2 if self.kind == "ddpm" else 1
        if self.num_train_timesteps < minimum:
            raise ConfigError(f"num_train_timesteps={self.num_train_timesteps}: must be >= {minimum}")
        last_beta = LINEAR_BETA_END * 1000 / self.num_train_timesteps  # ADM's 1000/T rescale of both ends
        if self.kind == "ddpm" and self.beta_schedule == "linear" and last_beta >= 1:
            raise ConfigError(f"num_train_timesteps={self.num_train_timesteps} with beta_schedule=linear: the 1000/T "
                              f"rescale makes the last beta {last_beta:g} >= 1 (no valid noise level); use "
                              f"num_train_timesteps >= {math.floor(LINEAR_BETA_END * 1000) + 1} or the cosine schedule")
        if self.min_snr_gamma <= 0:
            raise ConfigError(f"min_snr_gamma={self.min_snr_gamma}: must be > 0")
        if self.logit_normal_std <= 0:
            raise ConfigError(f"logit_normal_std={self.logit_normal_std}: must be > 0")


# ---------------------------------------------------------------------------------------------
# Sampling (how a trained model turns noise into latents)
# ---------------------------------------------------------------------------------------------

SamplerName = Literal["dpm_solver", "ddim", "ddpm", "euler", "heun"]
CfgSchedule = Literal["constant", "linear"]
FusedMode = Literal["auto", "on", "off"]
# The samplers each process can be solved with, and the DPM-Solver++ orders offered.
SAMPLERS = {"ddpm": ("dpm_solver", "ddim", "ddpm"), "flow": ("euler", "heun")}
DPM_SOLVER_ORDERS = (1, 2)


@dataclass
class SamplerConfig:
    """Solver and guidance settings for ``model.generate`` (CFG = classifier-free guidance)."""

    sampler: SamplerName = "dpm_solver"  # ddpm process: dpm_solver | ddim | ddpm; flow: euler | heun
    num_steps: int = 20  # solver steps per token (LatentLM) or per image (DiT); 20 is the paper setting
    solver_order: int = 2  # DPM-Solver++ order (1 or 2)
    cfg_scale: float = 1.0  # classifier-free guidance scale; 1.0 disables guidance (no null-class pass)
    # "constant": cfg_scale everywhere; "linear": LatentLM token i uses 1 + (cfg_scale - 1) * (i + 1) / L
    # (MAR's schedule: weak guidance for the first tokens, full guidance for the last).
    cfg_schedule: CfgSchedule = "constant"
    temperature: float = 1.0  # scales the initial noise (and the ancestral noise of the ddpm sampler)
    # LatentLM: each token's whole solver run and the KV-cached backbone step through torch.compile (and, on
    # CUDA, replayed as CUDA graphs), with the head's timestep embeddings and modulations computed once per
    # call / token; DiT: its denoiser through torch.compile. "auto": on for CUDA with a deterministic sampler,
    # off elsewhere (compiling takes ~a minute, needs a C++ compiler on CPU). Changes float rounding, never the
    # math, so it is part of the sample-many settings.
    fused: FusedMode = "auto"

    @property
    def guided(self) -> bool:
        """Whether sampling runs the null-class pass: guidance is a no-op only at constant scale 1."""
        return self.cfg_scale != 1.0 or self.cfg_schedule != "constant"

    def fused_on(self, device_type: str) -> bool:
        """Whether ``generate`` on a device of this type (``torch.device.type``) takes the fused path."""
        if self.fused == "auto":
            return device_type == "cuda" and self.sampler != "ddpm"
        return self.fused == "on"

    def validate(self, model: ModelConfig) -> None:
        """Raise ``ConfigError`` when these settings cannot sample a model of ``model``.

        The one check of sampler rules: commands call it before any work, ``generate`` once per call;
        the solvers themselves trust it.
        """
        kind = model.process.kind
        if self.sampler not in SAMPLERS.get(kind, ()):
            raise ConfigError(f"sampler: sampler={self.sampler!r} does not fit a {kind} process; allowed: "
                              f"{SAMPLERS.get(kind)}")
        if self.num_steps < 1:
            raise ConfigError(f"sampler: num_steps={self.num_steps}: must be >= 1")
        if kind == "ddpm" and self.num_steps > model.process.num_train_timesteps - 1:
            raise ConfigError(f"sampler: num_steps={self.num_steps}: linspace spacing needs 1 <= num_steps <= "
                              f"{model.process.num_train_timesteps - 1}")
        if self.solver_order not in DPM_SOLVER_ORDERS:
            raise ConfigError(f"sampler: solver_order={self.solver_order}: must be one of {DPM_SOLVER_ORDERS}")
        _choice(self.cfg_schedule, ("constant", "linear"), "sampler.cfg_schedule")
        _choice(self.fused, ("auto", "on", "off"), "sampler.fused")
        if self.fused == "on" and self.sampler == "ddpm":
            raise ConfigError("sampler.fused='on' needs a deterministic sampler: 'ddpm' draws noise inside the solver "
                              "loop; use --sampler.fused auto/off or another sampler")
        if model.family == "dit" and self.cfg_schedule != "constant":
            raise ConfigError(f"sampler.cfg_schedule={self.cfg_schedule!r} follows LatentLM's token order; "
                              "DiT allows only 'constant'")
        if not (math.isfinite(self.cfg_scale) and math.isfinite(self.temperature) and self.temperature > 0):
            raise ConfigError(f"sampler: cfg_scale={self.cfg_scale} and temperature={self.temperature} must be "
                              "finite, temperature > 0")
        if self.cfg_scale < 0:
            raise ConfigError(f"sampler: cfg_scale={self.cfg_scale}: must be >= 0 (1: no guidance, 0: unconditional; "
                              "a negative scale steers away from the class)")


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------

ModelFamily = Literal["latentlm", "dit"]
RopeFrequencies = Literal["geometric", "linspace"]
PositionTable = Literal["sincos", "mae"]


@dataclass
class ModelConfig:
    """Architecture of a LatentLM (causal Transformer + diffusion head) or a DiT baseline.

    Unless overridden, presets are shaped for ImageNet 256 with a 16-channel, 16x-downsampling
    tokenizer: latents (16, 16, 16), patch size 1, so L = 256 tokens of 16 values.
    """

    name: str = "Transformer-Tiny"  # preset: the CLI builds from it, and it decides the family (see cli.check_family)
    family: ModelFamily = "latentlm"
    # -- latent grid (set from the tokenizer) --
    in_channels: int = 16  # C: channels of one latent
    input_size: int = 16  # H = W of the latent grid
    patch_size: int = 1  # p: a token holds a p x p patch, so L = (H/p)^2 tokens of C p^2 values
    num_classes: int = 1000  # the label table has num_classes + 1 rows; the last is the null class
    # -- backbone --
    depth: int = 4  # number of Transformer blocks
    hidden_size: int = 128  # D
    num_heads: int = 4  # attention heads; head dim = D / num_heads
    num_kv_heads: int | None = None  # grouped-query attention; None = num_heads (plain MHA)
    mlp_ratio: float = 6.0  # SwiGLU hidden = int(D * mlp_ratio * 2/3 / 64) * 64 unless ffn_hidden_size
    ffn_hidden_size: int | None = None  # explicit SwiGLU hidden size (LatentLM-L uses 2730)
    rope_theta: float = 10000.0  # rotary base (LatentLM only; DiT uses fixed 2-D sin-cos positions)
    # rotary frequencies: "geometric" theta^(-2i/hd) (standard); "linspace" 1/theta^(i/(hd/2-1)), the reference
    # LatentLM code's (its interleaved rotation is our rotate-half on permuted q/k weights: see import-reference)
    rope_frequencies: RopeFrequencies = "geometric"
    # DiT positions: "sincos" rows first (ours); "mae": columns first in float32, MAE's and the reference code's
    position_table: PositionTable = "sincos"
    # -- diffusion head (LatentLM only) --
    head_depth: int = 3  # adaLN-Zero MLP blocks in the per-token diffusion head
    # SwiGLU hidden size of the head blocks; None = the backbone's (ffn_dim), as the paper's presets.
    # MAR's head MLP is D -> D: hidden_size gives a MAR-sized head (Transformer-Medium: 455.4M -> 427.1M).
    head_ffn_hidden_size: int | None = None
    batch_mul: int = 4  # head samples (timestep, noise) per token per backbone pass in training
    # -- conditioning --
    class_dropout_prob: float = 0.1  # training labels replaced by the null class (enables CFG)
    # -- training objective --
    process: ProcessConfig = field(default_factory=ProcessConfig)

    # Fields that change the objective but not the weights; every other field shapes the weights, so a
    # new field is an architecture field (refused on resume) unless it is listed here.
    OBJECTIVE_FIELDS = ("name", "batch_mul", "class_dropout_prob", "process")

    @property
    def token_dim(self) -> int:
        """Values per token: C * p^2."""
        return self.in_channels * self.patch_size**2

    @property
    def seq_len(self) -> int:
        """Tokens per image: L = (H / p)^2."""
        return (self.input_size // self.patch_size) ** 2

    @property
    def ffn_dim(self) -> int:
        """SwiGLU hidden size of the backbone blocks (and of the head blocks unless ``head_ffn_hidden_size``)."""
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        return int(self.hidden_size * self.mlp_ratio * 2 / 3 / 64) * 64

    @property
    def head_ffn_dim(self) -> int:
        """SwiGLU hidden size of the diffusion head's blocks: ``head_ffn_hidden_size``, else ``ffn_dim``."""
        return self.ffn_dim if self.head_ffn_hidden_size is None else self.head_ffn_hidden_size

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    def architecture(self) -> dict[str, Any]:
        """The fields that shape the weights (a checkpoint only loads into a model with the same ones)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in self.OBJECTIVE_FIELDS}

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the bad field and what is allowed."""
        if self.family not in ("latentlm", "dit"):
            raise ConfigError(f"family={self.family!r}: must be 'latentlm' or 'dit'")
        _at_least(self, 1, "in_channels", "input_size", "patch_size", "num_classes", "depth", "hidden_size",
                  "num_heads", "head_depth", "batch_mul")
        if self.input_size % self.patch_size:
            raise ConfigError(f"input_size={self.input_size} is not divisible by patch_size={self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if (self.hidden_size // self.num_heads) % 2:
            raise ConfigError(f"head dim {self.hidden_size // self.num_heads} must be even (rotary pairs)")
        if self.kv_heads < 1 or self.num_heads % self.kv_heads:
            raise ConfigError(f"num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads}")
        if self.ffn_dim < 1:
            raise ConfigError(f"SwiGLU hidden size {self.ffn_dim} < 1: raise mlp_ratio or set ffn_hidden_size")
        if self.head_ffn_hidden_size is not None and (self.family != "latentlm" or self.head_ffn_hidden_size < 1):
            raise ConfigError(f"head_ffn_hidden_size={self.head_ffn_hidden_size}: must be >= 1, and only LatentLM "
                              "has a diffusion head (leave it unset for DiT)")
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise ConfigError(f"class_dropout_prob={self.class_dropout_prob}: must be in [0, 1)")
        _choice(self.rope_frequencies, ("geometric", "linspace"), "rope_frequencies")
        _choice(self.position_table, ("sincos", "mae"), "position_table")
        self.process.validate()


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config dataclass as nested plain dicts (JSON-ready)."""
    return dataclasses.asdict(cfg)


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Rebuild a (possibly nested) config dataclass from ``to_dict`` output; unknown keys are refused."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} fields {unknown}; known: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        default = names[key].default_factory if names[key].default_factory is not dataclasses.MISSING else None
        nested = type(default()) if default is not None else None
        if nested is not None and dataclasses.is_dataclass(nested) and isinstance(value, dict):
            value = from_dict(nested, value)
        kwargs[key] = value
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------
# Data and tokenizers
# ---------------------------------------------------------------------------------------------

def default_num_workers(limit: int = 4) -> int:
    """DataLoader workers by default: ``min(limit, usable CPUs - 1)``, leaving a core to the main process (and
    staying under the count torch warns about)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(limit, cpus - 1))


DataKind = Literal["folder", "digits", "cached"]
TokenizerKind = Literal["identity", "sigma_vae", "kl16", "reference_sigma_vae"]
TOKENIZER_KINDS = ("identity", "sigma_vae", "kl16", "reference_sigma_vae")


@dataclass
class DataConfig:
    """Where training images come from. Every source yields (image (3, S, S) in [-1, 1], label)."""

    # "folder": ImageFolder at `path` (one sub-folder per class); "digits": bundled; "cached": a
    # `latentlm cache-latents` directory at `path` (the run's tokenizer and image_size must match it)
    kind: DataKind = "folder"
    path: str | None = None  # ImageFolder root (kind "folder") or latent cache (kind "cached"); never downloaded
    image_size: int = 256  # S: ADM centre crop to S x S; must be divisible by the tokenizer's factor
    hflip: bool = True  # random horizontal flip, drawn from the (checkpointed) torch RNG in the trainer
    # DataLoader worker processes per training process (0: load in the main process); default: min(4, CPUs - 1)
    num_workers: int = field(default_factory=default_num_workers)
    num_classes: int | None = None  # None: the number of classes the data has
    # Unreadable images are skipped, logged and counted; more than this fraction of them stops the run.
    max_bad_fraction: float = 0.01
    max_image_pixels: int = 89_478_485  # larger images are refused unread (decompression bombs); Pillow's default

    def validate(self) -> None:
        """Values and the existence of ``path`` (whether a cache is complete is checked when it is opened)."""
        _choice(self.kind, ("folder", "digits", "cached"), "data.kind")
        _at_least(self, 1, "image_size", "max_image_pixels", prefix="data.")
        _at_least(self, 0, "num_workers", prefix="data.")
        if self.num_classes is not None and self.num_classes < 1:
            raise ConfigError(f"data.num_classes={self.num_classes}: must be >= 1 (or unset to use the data's)")
        if not 0 <= self.max_bad_fraction <= 1:
            raise ConfigError(f"data.max_bad_fraction={self.max_bad_fraction}: must be in [0, 1]")
        if self.kind == "folder":
            if not self.path:
                raise ConfigError("data.kind=folder needs --data.path (an ImageFolder root: one sub-folder per class)")
            if not Path(self.path).is_dir():
                raise ConfigError(f"data.path={self.path}: no such directory (expected an ImageFolder root)")
        if self.kind == "cached" and not self.path:
            raise ConfigError("data.kind=cached needs --data.path (a directory written by `latentlm cache-latents`)")


@dataclass
class TokenizerConfig:
    """Which tokenizer turns images into latents, and how its normalization is fitted."""

    # "identity": pixels (f x f patches) as latents; "sigma_vae": a σ-VAE file; "kl16": MAR's KL-16 VAE file;
    # "reference_sigma_vae": a σ-VAE file of the original LatentLM code
    kind: TokenizerKind = "identity"
    path: str | None = None  # tokenizer checkpoint (σ-VAE: .safetensors file or its directory)
    patch: int = 1  # identity only: f, so a latent has 3 f^2 channels and side S / f
    sample_posterior: bool = True  # train on posterior samples (False: the posterior mode)
    # Images whose latents estimate scale = 1/std and bias = -mean (all when the data has fewer);
    # 0 keeps the tokenizer's stored stats (e.g. a σ-VAE saved with its own).
    norm_images: int = 10_000

    def validate(self) -> None:
        _choice(self.kind, TOKENIZER_KINDS, "tokenizer.kind")
        _at_least(self, 1, "patch", prefix="tokenizer.")
        _at_least(self, 0, "norm_images", prefix="tokenizer.")
        if self.kind == "sigma_vae" and not self.path:
            raise ConfigError("tokenizer.kind=sigma_vae needs --tokenizer.path "
                              "(a file written by `latentlm train-tokenizer`)")
        if self.kind == "kl16" and not self.path:
            raise ConfigError("tokenizer.kind=kl16 needs --tokenizer.path (MAR's kl16.ckpt, or its weights as "
                              ".safetensors)")
        if self.kind == "reference_sigma_vae" and not self.path:
            raise ConfigError("tokenizer.kind=reference_sigma_vae needs --tokenizer.path (a σ-VAE torch file "
                              "{'config': ..., 'model': ...} of the original LatentLM code)")
        if self.kind != "identity" and not Path(self.path).exists():
            raise ConfigError(f"tokenizer.path={self.path}: no such file or directory")


SigmaVAEVariant = Literal["conv", "vit"]


@dataclass
class SigmaVAEConfig:
    """Architecture and noise of a σ-VAE; every field is a constructor argument of ``SigmaVAE``."""

    variant: SigmaVAEVariant = "conv"  # "conv": small images (digits); "vit": ImageNet-size images
    image_channels: int = 3  # channels of the images it encodes (the tokenizer interface uses RGB)
    latent_channels: int = 8  # C of one latent token
    noise_std: float = 0.75  # C_σ: per-image noise scale s ~ N(0, C_σ²) (paper 0.75; reference 0.75/0.8)
    # -- conv variant --
    base_channels: int = 16  # width of the first conv level (16: the digits in ~0.13 s per step of 64 on a CPU)
    channel_mult: tuple[int, ...] = (1, 2, 2)  # width multiplier per level; downsample = 2^(levels-1)
    num_res_blocks: int = 1  # residual blocks per level (encoder and decoder)
    # -- vit variant --
    patch_size: int = 16  # pixels per side of one patch = one latent token (downsample factor)
    hidden_size: int = 256  # Transformer width of encoder and decoder
    depth: int = 4  # Transformer blocks in each of encoder and decoder
    num_heads: int = 4
    mlp_ratio: float = 4.0

    @property
    def downsample(self) -> int:
        if self.variant == "conv":
            return 2 ** (len(self.channel_mult) - 1)
        return self.patch_size

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the bad field and what is allowed."""
        if self.variant not in ("conv", "vit"):
            raise ConfigError(f"variant={self.variant!r}: must be 'conv' or 'vit'")
        _at_least(self, 1, "image_channels", "latent_channels", "base_channels", "num_res_blocks", "patch_size",
                  "hidden_size", "depth", "num_heads")
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ConfigError(f"channel_mult={self.channel_mult}: need at least one level, all >= 1")
        if self.noise_std < 0 or not math.isfinite(self.noise_std):
            raise ConfigError(f"noise_std={self.noise_std}: must be finite and >= 0")
        if self.variant == "vit" and (self.hidden_size % self.num_heads or self.hidden_size % 4):
            raise ConfigError(f"hidden_size={self.hidden_size}: the vit variant needs a multiple of num_heads="
                              f"{self.num_heads} and of 4 (the 2-D sin-cos position table)")


# ---------------------------------------------------------------------------------------------
# Training: latentlm train and latentlm train-tokenizer
# ---------------------------------------------------------------------------------------------

MixedPrecision = Literal["no", "fp16", "bf16"]
Strategy = Literal["ddp", "fsdp"]
LRSchedule = Literal["cosine", "constant"]


def _check_optimizer(cfg: Any) -> None:
    """The AdamW, schedule and EMA options both trainers share."""
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise ConfigError(f"lr={cfg.lr}: must be a finite number > 0")
    if not (math.isfinite(cfg.min_lr) and 0 <= cfg.min_lr <= cfg.lr):
        raise ConfigError(f"min_lr={cfg.min_lr}: must be finite and in [0, lr={cfg.lr}]")
    for name in ("weight_decay", "grad_clip"):
        value = getattr(cfg, name)
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"{name}={value}: must be a finite number >= 0")
    if len(cfg.betas) != 2 or not all(0 <= b < 1 for b in cfg.betas):
        raise ConfigError(f"betas={tuple(cfg.betas)}: need two values in [0, 1)")
    if not 0 <= cfg.ema_decay <= 1:
        raise ConfigError(f"ema_decay={cfg.ema_decay}: must be in [0, 1]")
    if cfg.stop_at_step is not None and cfg.stop_at_step < 1:
        raise ConfigError(f"stop_at_step={cfg.stop_at_step}: must be >= 1 (or unset)")
    _choice(cfg.mixed_precision, ("no", "fp16", "bf16"), "mixed_precision")
    if cfg.mixed_precision == "fp16" and cfg.cpu:
        raise ConfigError("mixed_precision=fp16 needs a CUDA GPU; use --mixed-precision bf16 or no")
    if cfg.resume not in (None, "auto") and not Path(cfg.resume).exists():
        raise ConfigError(f"resume={cfg.resume}: no such checkpoint or run directory (or use --resume auto)")


@dataclass
class TrainConfig:
    """One training run. Defaults are the paper's tokenizer-analysis recipe."""

    config: str | None = None  # recipe YAML; its values are defaults that command-line flags override
    output_dir: str = "runs/latentlm"  # run directory: checkpoints/, tb/, samples/, loss.png, train.log
    model: ModelConfig = field(default_factory=ModelConfig)  # in_channels/input_size/num_classes come from data
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    # -- schedule --
    max_steps: int = 200_000  # optimizer steps; also the length of the cosine decay
    stop_at_step: int | None = None  # checkpoint and stop here without changing the LR schedule (time limits)
    max_flops: float | None = None  # training FLOPs budget replacing max_steps: run and cosine end where it is reached
    batch_size: int = 256  # global images per optimizer step (all processes x all accumulation micro-steps)
    grad_accum_steps: int = 1  # micro-batches per optimizer step; per-process micro-batch = batch / (procs x this)
    # -- optimizer (AdamW) --
    lr: float = 1e-4  # peak learning rate, reached after warm-up
    min_lr: float = 0.0  # cosine decays to this at max_steps
    warmup_steps: int = 100  # linear warm-up from lr / warmup_steps to lr
    lr_schedule: LRSchedule = "cosine"  # after warm-up: "cosine" decay to min_lr, or "constant"
    betas: tuple[float, float] = (0.9, 0.98)  # paper; PyTorch's default 0.999 is slower to adapt
    eps: float = 1e-8  # AdamW epsilon
    weight_decay: float = 0.1  # tokenizer-analysis recipe (the reference script used 0.01)
    decay_all_params: bool = False  # False: norms, biases and embedding tables get no weight decay
    grad_clip: float = 1.0  # max global gradient L2 norm; 0 disables clipping
    # -- EMA of the weights (used for samples) --
    ema_decay: float = 0.9999  # EMA decay per step once warmed up (paper)
    ema_warmup: bool = True  # decay min(ema_decay, (1 + t) / (10 + t)) at update t, so early EMA tracks the model
    # -- hardware --
    mixed_precision: MixedPrecision = "bf16"  # "fp16" needs a CUDA GPU; use "no" on CPU (bf16 matmul is slow there)
    cpu: bool = False  # train on CPU even when a GPU is visible
    allow_tf32: bool = True  # TF32 matmuls on Ampere+ GPUs (fp32 runs only)
    peak_tflops: float | None = None  # per-GPU peak for the logged MFU (default: dense BF16 datasheet peak of the card)
    seed: int = 0  # model init, data order, noise; a run is reproducible from (config, seed)
    # -- scale: sharding, memory, speed --
    strategy: Strategy = "ddp"  # "fsdp": FSDP2, weights/grads/AdamW/EMA sharded over processes, one unit per block
    activation_checkpointing: bool = False  # recompute each block in backward: far less activation memory, ~30% slower
    compile: bool = False  # torch.compile the model's loss (the first steps compile, for minutes; faster after)
    # -- checkpoints and failures --
    checkpoint_every: int = 5_000  # steps between checkpoints (one is always written at the end)
    keep_last: int = 3  # complete checkpoints kept; older ones are deleted after a newer one is complete
    resume: str | None = None  # "auto": newest complete checkpoint in output_dir (none: start fresh); or a path
    allow_arch_change: bool = False  # resume even though the checkpoint's architecture differs (weights must fit)
    max_nonfinite_steps: int = 10  # consecutive steps with non-finite loss/gradients (skipped) before stopping
    # -- monitoring --
    log_every: int = 50  # steps between TensorBoard scalars and log lines
    sample_every: int = 5_000  # steps between sample-grid PNGs from the EMA weights (0: never)
    sample_classes: int = 8  # classes in those grids (spread evenly over all classes), 4 images each
    sampler: SamplerConfig = field(default_factory=SamplerConfig)  # for the grids
    tensorboard: bool = True  # scalars (loss, LR, grad norm, images/s, FLOPs, TFLOP/s, MFU) under output_dir/tb
    progress: bool = True  # tqdm bar with loss, LR and images/s

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the first invalid option. Cheap: touches no data and no model."""
        _at_least(self, 1, "max_steps", "batch_size", "grad_accum_steps", "checkpoint_every", "keep_last",
                  "log_every", "max_nonfinite_steps", "sample_classes")
        _at_least(self, 0, "warmup_steps", "sample_every", "seed")
        _check_optimizer(self)
        if not (math.isfinite(self.eps) and self.eps >= 0):
            raise ConfigError(f"eps={self.eps}: must be a finite number >= 0")
        for name in ("max_flops", "peak_tflops"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{name}={value}: must be a finite number > 0 (or unset)")
        if self.batch_size % self.grad_accum_steps:
            raise ConfigError(f"batch_size={self.batch_size} is not divisible by grad_accum_steps="
                              f"{self.grad_accum_steps}")
        if self.strategy == "fsdp" and self.mixed_precision == "fp16":
            raise ConfigError("strategy=fsdp with mixed_precision=fp16 is not supported (no sharded loss scaler); "
                              "use --mixed-precision bf16")
        try:
            self.model.validate()
        except ConfigError as err:
            raise ConfigError(f"model: {err}") from err
        self.sampler.validate(self.model)


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

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the first invalid option; touches no data and no model."""
        _at_least(self, 1, "max_steps", "batch_size", "checkpoint_every", "keep_last", "log_every")
        if self.warmup_steps < 0 or self.norm_images < 2:
            raise ConfigError(f"warmup_steps={self.warmup_steps} must be >= 0 and norm_images={self.norm_images} >= 2")
        if not math.isfinite(self.prior_weight) or self.prior_weight < 0:
            raise ConfigError(f"prior_weight={self.prior_weight}: must be a finite number >= 0")
        _check_optimizer(self)
        try:
            self.vae.validate()
        except ConfigError as err:
            raise ConfigError(f"vae: {err}") from err
        if self.data.image_size % self.vae.downsample:
            raise ConfigError(f"data.image_size={self.data.image_size} is not divisible by the σ-VAE's downsampling "
                              f"factor {self.vae.downsample}")
        self.data.validate()


# ---------------------------------------------------------------------------------------------
# Sampling and evaluation: sample, sample-many, evaluate, reference-stats
# ---------------------------------------------------------------------------------------------

WeightsDtype = Literal["float32", "bfloat16"]


@dataclass
class SampleConfig:
    """`latentlm sample`: a labelled grid PNG from a checkpoint."""

    checkpoint: str  # a checkpoint directory, or a run directory (its newest complete checkpoint)
    out: str = "samples/grid.png"  # PNG path; missing folders are created
    classes: tuple[int, ...] = (0, 1, 2, 3)  # one grid row per class id
    per_class: int = 8  # images per row
    sampler: SamplerConfig = field(default_factory=SamplerConfig)  # solver, steps, CFG scale, temperature
    seed: int = 0  # image k of the grid uses noise seeded by (seed, k)
    ema: bool = True  # EMA weights (False: the raw training weights)
    tokenizer_path: str | None = None  # override the tokenizer file recorded in the checkpoint
    device: str = "auto"  # "auto": CUDA when available, else CPU; or any torch device string

    def validate(self) -> None:
        _at_least(self, 1, "per_class")
        if not self.classes:
            raise ConfigError("classes is empty: pass --classes with at least one class id")
        if not self.out.lower().endswith(".png"):
            raise ConfigError(f"out={self.out}: must be a .png path")


@dataclass
class SampleManyConfig:
    """`latentlm sample-many`: many images from a checkpoint as one ADM-evaluator ``.npz``.

    Image k's noise (and its class in random-class mode) depends only on (seed, k); the work is cut
    into fixed shards of ``images_per_shard`` indices, so the file is byte-identical for any number of
    processes (``torchrun`` / ``accelerate launch``) at the same thread count per process.
    """

    checkpoint: str | None = None  # checkpoint or run directory (its newest complete checkpoint); required
    out: str = "samples/samples.npz"  # output .npz: arr_0 uint8 (N, S, S, 3), arr_1 labels; settings: <stem>.json
    per_class: int = 50  # images per class; image k has class k mod num_classes (50 x 1000 = FID-50K)
    num_images: int | None = None  # instead: N images with classes drawn uniformly from (seed, k)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)  # solver, steps, CFG scale/schedule, temperature
    seed: int = 0  # image k's noise stream is seeded by (seed, k)
    ema: bool = True  # EMA weights (False: the raw training weights)
    tokenizer_path: str | None = None  # override the tokenizer file recorded in the checkpoint
    images_per_shard: int = 1000  # unit of work, of atomic writes and of resume (<out stem>.shards/)
    batch_size: int = 125  # images per model.generate call (doubled inside under CFG); fixed per shard
    weights_dtype: WeightsDtype = "float32"  # "bfloat16": bf16 weights, solver state fp32 (GPU throughput)
    png_dir: str | None = None  # also write <png_dir>/<k, 6 digits>.png for every image
    keep_shards: bool = False  # keep <out stem>.shards/ once the .npz is assembled (else they are deleted)
    device: str = "auto"  # "auto": cuda:<LOCAL_RANK> when available, else CPU; or any torch device string
    progress: bool = True  # tqdm bar (first process) with images/s and ETA

    def validate(self) -> None:
        if not self.checkpoint:
            raise ConfigError("--checkpoint is required: a checkpoint directory or a run directory")
        if not self.out.endswith(".npz"):
            raise ConfigError(f"out={self.out}: must end in .npz (the ADM evaluator's format)")
        if self.num_images is None:
            _at_least(self, 1, "per_class")
        else:
            _at_least(self, 1, "num_images")
        _at_least(self, 1, "images_per_shard", "batch_size")
        _at_least(self, 0, "seed")


@dataclass
class EvaluateConfig(SampleManyConfig):
    """`latentlm evaluate`: FID, IS, sFID, precision/recall of ``out`` against ``reference``.

    With ``checkpoint``, ``out`` is generated first (resuming a partial run; skipped when complete
    with the same settings). Checkpoints trained on the bundled digits also get the digit-classifier
    accuracy and Fréchet distance. Results go to ``results`` with every setting that produced them.
    """

    reference: str | None = None  # ADM reference batch (.npz: arr_0 + mu/sigma), a mu/sigma .npz, or reference-stats
    inception_weights: str | None = None  # torch-fidelity Inception .pth; None: the torch hub cache (never downloads)
    results: str | None = None  # JSON path; None: <out stem>.eval.json
    eval_images: int | None = None  # score the first N images of out (refused if it has fewer); None: all
    inception_batch_size: int = 64  # images per Inception forward (torch-fidelity's default)
    isc_splits: int = 10  # Inception Score splits (torch-fidelity's default)
    prc_neighborhood: int = 3  # k of the k-NN manifolds of precision/recall (ADM, Kynkäänniemi et al.)

    def validate(self) -> None:
        if self.checkpoint:
            super().validate()
        if self.eval_images is not None and self.eval_images < 2:
            raise ConfigError(f"eval_images={self.eval_images}: need at least 2 images")
        if not self.checkpoint and not Path(self.out).is_file():
            raise ConfigError(f"samples {self.out} do not exist: pass --checkpoint to generate them, or --out an "
                              "existing .npz")


@dataclass
class SweepConfig:
    """`latentlm sweep`: score checkpoints over a grid of sampler settings (guidance scale and schedule,
    solver, steps, temperature), each point generated like `sample-many` (resumable shards) and scored like
    `evaluate`. Writes ``out/sweep.json`` (every point, the best per model and metric), ``out/sweep.png``
    (metric vs guidance scale) and prints a table; a killed sweep resumes, finished points are kept."""

    checkpoints: tuple[str, ...] = ()  # checkpoint or run directories (each its newest complete checkpoint)
    out: str = "sweeps/sweep"  # directory: points/<point>.npz (+ .json, .eval.json), sweep.json, sweep.png
    cfg_scales: tuple[float, ...] = (1.0, 1.5, 2.0, 3.0)  # guidance scales of the grid
    cfg_schedules: tuple[CfgSchedule, ...] = ("constant",)  # LatentLM only; DiT points use "constant"
    solvers: tuple[SamplerName, ...] = ()  # empty: sampler.sampler where it fits the model's process, else its first
    num_steps: tuple[int, ...] = (20,)  # solver steps of the grid
    temperatures: tuple[float, ...] = (1.0,)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)  # what the grid does not vary (e.g. solver_order)
    per_class: int = 10  # images per class per point (10 x 1000 = FID-10K); see sample-many
    num_images: int | None = None  # instead: N images with classes drawn from (seed, k)
    seed: int = 0
    ema: bool = True
    tokenizer_path: str | None = None
    images_per_shard: int = 1000
    batch_size: int = 125
    weights_dtype: WeightsDtype = "float32"
    device: str = "auto"
    progress: bool = True
    # -- scoring (as evaluate) --
    reference: str | None = None  # ADM reference batch or mu/sigma .npz; not needed for digits checkpoints
    inception_weights: str | None = None
    inception_batch_size: int = 64
    isc_splits: int = 10
    prc_neighborhood: int = 3

    def validate(self) -> None:
        if not self.checkpoints:
            raise ConfigError("--checkpoints is required: one or more checkpoint or run directories")
        for name in ("cfg_scales", "cfg_schedules", "num_steps", "temperatures"):
            if not getattr(self, name):
                raise ConfigError(f"{name} is empty: give at least one value")
        if any(not (math.isfinite(s) and s >= 0) for s in self.cfg_scales) or any(not t > 0 for t in self.temperatures):
            raise ConfigError(f"cfg_scales={self.cfg_scales} must be finite and >= 0, and temperatures="
                              f"{self.temperatures} > 0")
        if any(n < 1 for n in self.num_steps):
            raise ConfigError(f"num_steps={self.num_steps}: every value must be >= 1")
        for schedule in self.cfg_schedules:
            _choice(schedule, ("constant", "linear"), "cfg_schedules")
        if self.num_images is None:
            _at_least(self, 1, "per_class")
        else:
            _at_least(self, 2, "num_images")
        _at_least(self, 1, "images_per_shard", "batch_size")


@dataclass
class ReferenceStatsConfig:
    """`latentlm reference-stats`: Inception statistics of an ImageFolder, saved as an ADM-style ``.npz``.

    Images get the training pipeline's ADM centre crop to ``image_size``; the file holds ``mu``/``sigma``
    (pool_3, 2048-d), ``mu_s``/``sigma_s`` (spatial mixed_6/conv features, 2023-d) and, when
    ``save_images`` > 0, ``arr_0`` (uint8 images for precision/recall).
    """

    folder: str  # ImageFolder root: one sub-folder per class, images inside (searched recursively)
    out: str = "reference.npz"  # output .npz; a JSON with the settings is written beside it
    image_size: int = 256  # S of the ADM centre crop (the generated images' size)
    max_images: int | None = None  # a seeded random subset of this many images; None: all of them
    save_images: int = 10_000  # the first this-many images of the (seeded) order are stored as arr_0; 0: none
    seed: int = 0  # order of the images (the subset and the stored ones)
    inception_weights: str | None = None  # torch-fidelity Inception .pth; None: the torch hub cache (never downloads)
    batch_size: int = 64  # images per Inception forward
    num_workers: int = field(default_factory=default_num_workers)  # DataLoader processes; min(4, CPUs - 1)
    device: str = "auto"  # "auto": CUDA when available, else CPU
    progress: bool = True

    def validate(self) -> None:
        if not self.out.endswith(".npz"):
            raise ConfigError(f"out={self.out}: must end in .npz")
        _at_least(self, 1, "image_size", "batch_size")
        if self.save_images < 0 or (self.max_images is not None and self.max_images < 2):
            raise ConfigError(f"save_images={self.save_images} must be >= 0 and max_images={self.max_images} >= 2")


# ---------------------------------------------------------------------------------------------
# The ImageNet path: scan-images, cache-latents, vae-roundtrip
# ---------------------------------------------------------------------------------------------

CacheDtype = Literal["float32", "float16"]


@dataclass
class ScanImagesConfig:
    """`latentlm scan-images`: decode every image of an ImageFolder exactly as training does and list the
    unreadable ones (``path<TAB>reason`` on stdout). Exit code 0 when all are readable, 1 otherwise."""

    data: DataConfig = field(default_factory=DataConfig)  # path, image_size, num_workers, max_image_pixels
    out: str | None = None  # also write the list to this file (empty when all are readable)
    batch_size: int = 64  # images per DataLoader batch
    progress: bool = True

    def validate(self) -> None:
        if self.data.kind != "folder" or not self.data.path:
            raise ConfigError("scan-images reads an ImageFolder: pass --data.path ROOT")
        if self.batch_size < 1 or self.data.image_size < 1 or self.data.num_workers < 0:
            raise ConfigError(f"batch_size={self.batch_size}, data.image_size={self.data.image_size} must be >= 1 "
                              f"and data.num_workers={self.data.num_workers} >= 0")


@dataclass
class CacheLatentsConfig:
    """`latentlm cache-latents`: encode a dataset once into shards of posterior moments (image and flip).

    Any number of processes (``torchrun`` / ``accelerate launch``) share the shards without collisions;
    a killed run rerun with the same options finishes the missing shards and ends with the same files.
    Train from it with ``latentlm train --data.kind cached --data.path OUT`` and the same tokenizer.
    """

    out: str  # cache directory: plan.json, shards/, manifest.json (written last)
    data: DataConfig = field(default_factory=DataConfig)  # images (kind folder or digits); hflip is ignored
    # The encoder. norm_images: images (seeded random subset) for the normalization stats; sample_posterior is
    # ignored: stats of posterior samples and of the mode are both stored, the training run picks its own.
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    images_per_shard: int = 1000  # unit of work, of atomic writes and of resume; fixes the shard boundaries
    batch_size: int = 64  # images per encoder call (each encoded twice: as is and flipped)
    dtype: CacheDtype = "float32"  # moments on disk; float32 trains exactly like encoding on the fly
    seed: int = 0  # which images feed the normalization stats, and their posterior noise
    device: str = "auto"  # "auto": cuda:<LOCAL_RANK> when available, else CPU; or any torch device string
    progress: bool = True

    def validate(self) -> None:
        _at_least(self, 1, "images_per_shard", "batch_size")
        _choice(self.dtype, ("float32", "float16"), "dtype")
        if self.data.kind == "cached":
            raise ConfigError("data.kind=cached: cache-latents encodes images (kind folder or digits)")


@dataclass
class VaeRoundtripConfig:
    """`latentlm vae-roundtrip`: encode and decode images, write original | reconstruction side by side as
    a PNG (one row per image), print PSNR and SSIM of each and their mean."""

    tokenizer: str  # tokenizer file: KL-16 (.ckpt/.pt/.safetensors) or σ-VAE (.safetensors file, its directory, .pt)
    images: tuple[str, ...] = ()  # image files; empty: num_images random files from `folder`
    folder: str | None = None  # a folder searched recursively for images (e.g. an ImageFolder root)
    num_images: int = 8  # random images taken from `folder` (seeded)
    image_size: int = 256  # ADM centre crop, as in training
    out: str = "roundtrip.png"  # PNG path; missing folders are created
    sample_posterior: bool = False  # decode a posterior sample instead of the posterior mean
    seed: int = 0  # choice of images, and the posterior noise
    max_image_pixels: int = 89_478_485  # larger images are refused unread (decompression bombs)
    device: str = "auto"  # "auto": CUDA when available, else CPU

    def validate(self) -> None:
        if self.num_images < 1 or self.image_size < 1:
            raise ConfigError(f"num_images={self.num_images} and image_size={self.image_size} must be >= 1")
        if not self.images and self.folder is None:
            raise ConfigError("give image files (--images a.jpg b.png) or a folder to draw from (--folder DIR)")
        if not self.images and not Path(self.folder).is_dir():
            raise ConfigError(f"folder={self.folder}: no such directory")


@dataclass
class PlanMemoryConfig:
    """`latentlm plan-memory`: per-GPU memory of training a preset (``latentlm.memory``: weights, gradients,
    AdamW, EMA, activations, total) and whether it fits, before renting the GPUs. No model is built."""

    model: str = "Transformer-Medium"  # a preset (latentlm.models.list_models()), or "all" for every preset
    gpus: int = 8  # processes, one GPU each
    batch_size: int = 256  # global images per optimizer step
    grad_accum_steps: int = 1  # micro-batches per step: per-GPU micro-batch = batch / (gpus x this)
    strategy: Strategy = "ddp"  # "fsdp": weights, gradients, AdamW and EMA sharded over the GPUs
    activation_checkpointing: bool = False  # keep only each block's input, recompute in backward
    mixed_precision: MixedPrecision = "bf16"  # the run's --mixed-precision: activation and weight-copy bytes
    gpu_memory_gb: float = 80  # memory of one GPU in GiB (an "80 GB" H100 has 80 GiB)

    def validate(self) -> None:
        _at_least(self, 1, "gpus", "batch_size", "grad_accum_steps")
        if not (math.isfinite(self.gpu_memory_gb) and self.gpu_memory_gb > 0):
            raise ConfigError(f"gpu_memory_gb={self.gpu_memory_gb}: must be a number > 0")
        if self.batch_size % (self.gpus * self.grad_accum_steps):
            raise ConfigError(f"batch_size={self.batch_size} is not divisible by gpus x grad_accum_steps = "
                              f"{self.gpus} x {self.grad_accum_steps}; choose a multiple of "
                              f"{self.gpus * self.grad_accum_steps}")


@dataclass
class ExportWeightsConfig:
    """`latentlm export-weights`: a checkpoint's weights and EMA consolidated into ``model.safetensors`` and
    ``ema.safetensors`` (an FSDP run's are sharded), as a run directory that ``sample``, ``sample-many`` and
    ``evaluate`` read. The run's optimizer state stays in the run: resume from the run itself."""

    checkpoint: str  # a checkpoint directory, or a run directory (its newest complete checkpoint)
    out: str  # the run directory to create: <out>/checkpoints/step-<N>/ (must hold no checkpoints yet)

    def validate(self) -> None:
        if not Path(self.checkpoint).exists():
            raise ConfigError(f"checkpoint={self.checkpoint}: no such directory (a checkpoint or a run directory)")


@dataclass
class ImportReferenceConfig:
    """`latentlm import-reference`: a checkpoint of the reference LatentLM code (``train_hf.py``'s
    ``checkpoint-<step>/`` or its run's ``latest`` file) plus its tokenizer file -> a latentlm run directory
    that ``sample``, ``sample-many``, ``evaluate`` and ``train --resume`` use like any other run."""

    checkpoint: str  # checkpoint-<step> directory, the run's `latest` file, or the run directory holding it
    tokenizer: str  # the σ-VAE (the reference code's or ours) or KL-16 file the run trained with
    out: str  # the latentlm run directory to create (must hold no checkpoints yet)
    preset: str | None = None  # the run's --model (e.g. Transformer-L, DiT-XL): num_heads, and the shapes to check
    num_heads: int | None = None  # instead of --preset for models outside the presets (not readable from weights)
    image_size: int = 256  # the run's --image_size: with the tokenizer it fixes the latent grid
    # The run's DDPM settings (not stored in its checkpoints); train_hf.py's defaults:
    prediction_type: PredictionType = "epsilon"
    beta_schedule: BetaSchedule = "cosine"
    batch_mul: int = 4  # its --ddpm_batch_mul

    def validate(self) -> None:
        if self.preset is None and self.num_heads is None:
            raise ConfigError("pass --preset (the run's --model, e.g. Transformer-L) or --num-heads: the number of "
                              "attention heads cannot be read from the weights")
        if self.num_heads is not None and self.num_heads < 1:
            raise ConfigError(f"num_heads={self.num_heads}: must be >= 1")
        _at_least(self, 1, "image_size", "batch_mul")
        if not Path(self.checkpoint).exists():
            raise ConfigError(f"checkpoint={self.checkpoint}: no such file or directory")
        if not Path(self.tokenizer).is_file():
            raise ConfigError(f"tokenizer={self.tokenizer}: no such file (the σ-VAE or KL-16 file of the run)")


@dataclass
class RecipesConfig:
    """`latentlm recipes`: list the recipes shipped with the package (``--config NAME``), one line each."""

    def validate(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# The demo
# ---------------------------------------------------------------------------------------------


DEMO_GRID_COLUMNS = 10  # images per class (row) in the demo's grids


def _demo_vae() -> SigmaVAEConfig:
    # C_σ 0.25, not the paper's 0.75: it reconstructs as well, and LatentLM trained on its latents draws the
    # requested class more often at weak guidance (96% vs 90% at CFG 1.25), so it needs less guidance
    # (docs/digits-quality.md).
    return SigmaVAEConfig(variant="conv", latent_channels=8, base_channels=16, channel_mult=(1, 2, 2),
                          noise_std=0.25)


def _demo_sampler() -> SamplerConfig:
    return SamplerConfig(sampler="dpm_solver", num_steps=20, cfg_scale=2.0)


@dataclass
class DemoConfig:
    """``latentlm demo``: defaults finish in under 10 minutes on 2 CPU cores."""

    output_dir: str | None = None  # run directory; None: runs/demo-<timestamp>
    seed: int = 0  # every phase's seed derives from it
    image_size: int = 16  # digits are resized from 8x8 to this side
    # -- σ-VAE: 16x16 -> 4x4 latents of 8 channels, so LatentLM reads 16 tokens of 8 values --
    vae: SigmaVAEConfig = field(default_factory=_demo_vae)
    vae_steps: int = 400  # σ-VAE optimizer steps (batch 64, peak LR 3e-3)
    # -- generators: both get the same steps, batch, LR and latents --
    latentlm_model: str = "Transformer-Tiny"  # preset of the next-token diffusion model
    dit_model: str = "DiT-Tiny"  # preset of the baseline
    # Head samples per token per backbone pass. The preset's 4 amortises a big backbone; on this tiny one
    # the head dominates, 1 halves the CPU time per step and gave at least as much accuracy per CPU-second.
    latentlm_batch_mul: int = 1
    steps: int = 400  # LatentLM's optimizer steps
    # DiT's optimizer steps; None: as many as give it LatentLM's training FLOPs (latentlm.flops), so the
    # comparison is at equal training compute rather than at equal steps
    dit_steps: int | None = None
    batch_size: int = 64  # images per step
    lr: float = 2e-3  # peak LR after a warm-up over a tenth of the steps, then cosine decay
    ema_decay: float = 0.999  # short runs need a short EMA
    sampler: SamplerConfig = field(default_factory=_demo_sampler)  # 20 DPM-Solver++ steps; cfg_scale: the fixed scale
    # -- evaluation --
    cfg_scales: tuple[float, ...] = (1.0, 1.25, 1.5, 1.75, 2.0, 3.0)  # the guidance sweep of both models
    min_accuracy: float = 0.97  # a model's best scale: the lowest Fréchet ratio among scales with this accuracy
    classifier_epochs: int = 20  # the metric's CNN: ~97% on the real test digits
    eval_per_class: int = 30  # generated images per class, all scored; the first 10 per class form the grid (>= 10)
    threads: int | None = 1  # torch CPU threads; 1 is fastest for these tiny models and robust to a busy machine
    progress: bool = True  # tqdm bars per phase

    def validate(self) -> None:
        _at_least(self, 1, "image_size", "vae_steps", "latentlm_batch_mul", "steps", "batch_size",
                  "classifier_epochs", "eval_per_class")
        if self.dit_steps is not None and self.dit_steps < 1:
            raise ConfigError(f"dit_steps={self.dit_steps}: must be >= 1 (or unset for equal training FLOPs)")
        if not self.cfg_scales or any(not (math.isfinite(s) and s >= 0) for s in self.cfg_scales):
            raise ConfigError(f"cfg_scales={self.cfg_scales}: give at least one finite guidance scale >= 0")
        if self.eval_per_class < DEMO_GRID_COLUMNS:
            raise ConfigError(f"eval_per_class={self.eval_per_class}: must be >= {DEMO_GRID_COLUMNS} (the grids show "
                              f"the first {DEMO_GRID_COLUMNS} images of each class, and all generated images are "
                              "scored)")
        self.sampler.validate(ModelConfig())  # the demo's models: a DDPM process
        from latentlm.models.registry import PRESETS  # torch-free; imported here, it imports this module

        for name, family in (("latentlm_model", "latentlm"), ("dit_model", "dit")):
            preset = getattr(self, name)
            if PRESETS.get(preset, {"family": None}).get("family", "latentlm") != family:
                known = ", ".join(n for n, p in PRESETS.items() if p.get("family", "latentlm") == family)
                raise ConfigError(f"{name}={preset!r}: not a {family} preset; choose one of {known}")
        if not 0 <= self.min_accuracy <= 1:
            raise ConfigError(f"min_accuracy={self.min_accuracy}: must be in [0, 1]")
        try:
            self.vae.validate()
        except ConfigError as err:
            raise ConfigError(f"vae: {err}") from err
