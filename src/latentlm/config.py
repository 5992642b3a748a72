"""Configuration dataclasses, one per concern.

Every dataclass here is plain data: it round-trips through ``dataclasses.asdict`` / JSON and is
saved with every checkpoint, so a run can always be rebuilt from its own directory.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

# ---------------------------------------------------------------------------------------------
# Diffusion / flow process (what the model is trained to predict)
# ---------------------------------------------------------------------------------------------

ProcessKind = Literal["ddpm", "flow"]
BetaSchedule = Literal["linear", "cosine"]
PredictionType = Literal["epsilon", "v_prediction"]
TimestepSampling = Literal["uniform", "min_snr", "logit_normal"]


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


# ---------------------------------------------------------------------------------------------
# Sampling (how a trained model turns noise into latents)
# ---------------------------------------------------------------------------------------------

SamplerName = Literal["dpm_solver", "ddim", "ddpm", "euler", "heun"]
CfgSchedule = Literal["constant", "linear"]


@dataclass
class SamplerConfig:
    """Solver and guidance settings for ``model.generate``."""

    sampler: SamplerName = "dpm_solver"  # ddpm process: dpm_solver | ddim | ddpm; flow: euler | heun
    num_steps: int = 20  # solver steps per token (LatentLM) or per image (DiT); 20 is the paper setting
    solver_order: int = 2  # DPM-Solver++ order (1 or 2)
    cfg_scale: float = 1.0  # classifier-free guidance scale; 1.0 disables guidance (no null-class pass)
    # "constant": cfg_scale everywhere; "linear": LatentLM token i uses 1 + (cfg_scale - 1) * (i + 1) / L
    # (MAR's schedule: weak guidance for the first tokens, full guidance for the last).
    cfg_schedule: CfgSchedule = "constant"
    temperature: float = 1.0  # scales the initial noise (and the ancestral noise of the ddpm sampler)


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------

ModelFamily = Literal["latentlm", "dit"]


@dataclass
class ModelConfig:
    """Architecture of a LatentLM (causal Transformer + diffusion head) or a DiT baseline.

    Unless overridden, presets are shaped for ImageNet 256 with a 16-channel, 16x-downsampling
    tokenizer: latents (16, 16, 16), patch size 1, so L = 256 tokens of 16 values.
    """

    name: str = "Transformer-Tiny"  # preset this config came from (informational)
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
    # -- diffusion head (LatentLM only) --
    head_depth: int = 3  # adaLN-Zero MLP blocks in the per-token diffusion head
    batch_mul: int = 4  # head samples (timestep, noise) per token per backbone pass in training
    # -- conditioning --
    class_dropout_prob: float = 0.1  # training labels replaced by the null class (enables CFG)
    # -- training objective --
    process: ProcessConfig = field(default_factory=ProcessConfig)

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
        """SwiGLU hidden size shared by backbone blocks and head blocks."""
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        return int(self.hidden_size * self.mlp_ratio * 2 / 3 / 64) * 64

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    def validate(self) -> None:
        """Raise ``ValueError`` naming the bad field and what is allowed."""
        if self.family not in ("latentlm", "dit"):
            raise ValueError(f"family={self.family!r}: must be 'latentlm' or 'dit'")
        for name in ("in_channels", "input_size", "patch_size", "num_classes", "depth", "hidden_size",
                     "num_heads", "head_depth", "batch_mul"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        if self.input_size % self.patch_size:
            raise ValueError(f"input_size={self.input_size} is not divisible by patch_size={self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError(f"head dim {self.hidden_size // self.num_heads} must be even (rotary pairs)")
        if self.kv_heads < 1 or self.num_heads % self.kv_heads:
            raise ValueError(f"num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads}")
        if self.ffn_dim < 1:
            raise ValueError(f"SwiGLU hidden size {self.ffn_dim} < 1: raise mlp_ratio or set ffn_hidden_size")
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise ValueError(f"class_dropout_prob={self.class_dropout_prob}: must be in [0, 1)")


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config dataclass as nested plain dicts (JSON-ready)."""
    return dataclasses.asdict(cfg)


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Rebuild a (possibly nested) config dataclass from ``to_dict`` output; unknown keys are refused."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}; known: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        default = names[key].default_factory if names[key].default_factory is not dataclasses.MISSING else None
        nested = type(default()) if default is not None else None
        if nested is not None and dataclasses.is_dataclass(nested) and isinstance(value, dict):
            value = from_dict(nested, value)
        kwargs[key] = value
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------
# Training, data, tokenizer and command configs (the trainer and the CLI)
# ---------------------------------------------------------------------------------------------


class ConfigError(ValueError):
    """An invalid option, found before any data or model work; the CLI prints it and exits with code 2."""


DataKind = Literal["folder", "digits", "cached"]
TokenizerKind = Literal["identity", "sigma_vae", "kl16"]
MixedPrecision = Literal["no", "fp16", "bf16"]
LRSchedule = Literal["cosine", "constant"]


@dataclass
class DataConfig:
    """Where training images come from. Every source yields (image (3, S, S) in [-1, 1], label)."""

    # "folder": ImageFolder at `path` (one sub-folder per class); "digits": bundled; "cached": a
    # `latentlm cache-latents` directory at `path` (the run's tokenizer and image_size must match it)
    kind: DataKind = "folder"
    path: str | None = None  # ImageFolder root (kind "folder") or latent cache (kind "cached"); never downloaded
    image_size: int = 256  # S: ADM centre crop to S x S; must be divisible by the tokenizer's factor
    hflip: bool = True  # random horizontal flip, drawn from the (checkpointed) torch RNG in the trainer
    num_workers: int = 4  # DataLoader worker processes per training process (0: load in the main process)
    num_classes: int | None = None  # None: the number of classes the data has
    # Unreadable images are skipped, logged and counted; more than this fraction of them stops the run.
    max_bad_fraction: float = 0.01
    max_image_pixels: int = 89_478_485  # larger images are refused unread (decompression bombs); Pillow's default


@dataclass
class TokenizerConfig:
    """Which tokenizer turns images into latents, and how its normalization is fitted."""

    # "identity": pixels (f x f patches) as latents; "sigma_vae": a σ-VAE file; "kl16": MAR's KL-16 VAE file
    kind: TokenizerKind = "identity"
    path: str | None = None  # tokenizer checkpoint (σ-VAE: .safetensors file or its directory)
    patch: int = 1  # identity only: f, so a latent has 3 f^2 channels and side S / f
    sample_posterior: bool = True  # train on posterior samples (False: the posterior mode)
    # Images whose latents estimate scale = 1/std and bias = -mean (all when the data has fewer);
    # 0 keeps the tokenizer's stored stats (e.g. a σ-VAE saved with its own).
    norm_images: int = 10_000


@dataclass
class TrainConfig:
    """One training run. Defaults are the paper's tokenizer-analysis recipe (SPEC §8)."""

    config: str | None = None  # recipe YAML; its values are defaults that command-line flags override
    output_dir: str = "runs/latentlm"  # run directory: checkpoints/, tb/, samples/, loss.png, train.log
    model: ModelConfig = field(default_factory=ModelConfig)  # in_channels/input_size/num_classes come from data
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    # -- schedule --
    max_steps: int = 200_000  # optimizer steps; also the length of the cosine decay
    stop_at_step: int | None = None  # checkpoint and stop here without changing the LR schedule (time limits)
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
    seed: int = 0  # model init, data order, noise; a run is reproducible from (config, seed)
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
    tensorboard: bool = True  # scalars (loss, LR, grad norm, images/s) under output_dir/tb
    progress: bool = True  # tqdm bar with loss, LR and images/s


@dataclass
class SampleCommandConfig:
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


# ---------------------------------------------------------------------------------------------
# Large-scale generation and evaluation (FID-50K): sample-many, evaluate, reference-stats
# ---------------------------------------------------------------------------------------------

WeightsDtype = Literal["float32", "bfloat16"]


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
    num_workers: int = 4  # DataLoader processes decoding and cropping images
    device: str = "auto"  # "auto": CUDA when available, else CPU
    progress: bool = True


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


@dataclass
class RoundtripConfig:
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
