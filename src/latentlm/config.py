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
