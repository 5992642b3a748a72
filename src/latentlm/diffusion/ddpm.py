"""Discrete variance-preserving diffusion (DDPM) and its reference samplers DDIM and DDPM-ancestral.

Notation: T = ``num_train_timesteps``; integer timesteps t = 0..T-1; ``alphas_cumprod[t]`` = ᾱ_t;
x_t = √ᾱ_t · x0 + √(1-ᾱ_t) · ε. The network sees t itself as a float (``model_time``).
"Clean" is written t = -1 with ᾱ = 1 (diffusers' ``set_alpha_to_one`` / ``final_sigmas_type="zero"``).

Schedules and samplers agree with diffusers' ``DDPMScheduler`` / ``DDIMScheduler`` (pinned in
``tests/test_diffusion.py``); the schedule is kept in float64 while diffusers keeps it in float32.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from latentlm.config import ProcessConfig
from latentlm.diffusion.common import (
    Denoiser,
    RandnFn,
    draw_device,
    full_time,
    per_sample,
    per_sample_mse,
    standard_normal,
    time_dtype,
)

BETA_SCHEDULES = ("linear", "cosine")
PREDICTION_TYPES = ("epsilon", "v_prediction")
TIMESTEP_SPACINGS = ("linspace", "leading")


def make_betas(schedule: str, num_train_timesteps: int) -> Tensor:
    """β_0..β_{T-1} as a float64 tensor (T,).

    ``linear``: 1e-4 → 0.02 for T = 1000; for other T both ends are scaled by 1000/T (ADM's rule, so
    the total noise stays about the same; diffusers does not scale, which only matters for T ≠ 1000).
    ``cosine``: Nichol & Dhariwal's ᾱ(s) = cos²(((s + 0.008)/1.008)·π/2), s = t/T, with
    β_i = min(1 - ᾱ((i+1)/T)/ᾱ(i/T), 0.999) (diffusers' ``squaredcos_cap_v2``).
    """
    steps = num_train_timesteps
    if schedule == "linear":
        scale = 1000.0 / steps
        return torch.linspace(scale * 1e-4, scale * 0.02, steps, dtype=torch.float64)
    if schedule == "cosine":

        def alpha_bar(s: float) -> float:
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), 0.999) for i in range(steps)]
        return torch.tensor(betas, dtype=torch.float64)
    raise ValueError(f"beta_schedule={schedule!r}: must be one of {BETA_SCHEDULES}")


def min_snr_weights(alphas_cumprod: Tensor, gamma: float, prediction_type: str) -> Tensor:
    """Min-SNR-γ loss weight per timestep (Hang et al. 2023), float64 (T,).

    SNR_t = ᾱ_t / (1 - ᾱ_t). For an epsilon target the weight is min(SNR, γ)/SNR; for a v target
    (whose loss already carries a factor SNR + 1 relative to the x0 loss) it is min(SNR, γ)/(SNR + 1).
    """
    snr = alphas_cumprod / (1 - alphas_cumprod)
    clipped = snr.clamp(max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    raise ValueError(f"prediction_type={prediction_type!r}: must be one of {PREDICTION_TYPES}")


def inference_timesteps(num_train_timesteps: int, num_steps: int, spacing: str = "linspace") -> list[int]:
    """Descending integer timesteps at which a sampler evaluates the network (``num_steps`` of them).

    ``linspace``: round(linspace(0, T-1, num_steps + 1))[::-1][:-1] — starts at T-1 (pure noise),
    the grid of diffusers' DPM-Solver (``timestep_spacing="linspace"``); needs num_steps ≤ T-1 so the
    rounded values stay distinct. ``leading``: (arange(num_steps) · (T // num_steps))[::-1] — the
    default of diffusers' DDIM/DDPM schedulers; starts at (num_steps-1)·(T//num_steps), not T-1.
    After the last entry every sampler steps to clean data (t = -1, ᾱ = 1).
    """
    steps = num_train_timesteps
    if spacing == "linspace":
        if not 1 <= num_steps <= steps - 1:
            raise ValueError(f"num_steps={num_steps}: linspace spacing needs 1 <= num_steps <= {steps - 1}")
        # np.linspace(0, T-1, n+1).round() as diffusers builds it: i·step in float64 with the end exactly T-1,
        # rounded half to even (Python's round); plain Python, so torch.compile sees constants, not traced numpy.
        step = (steps - 1) / num_steps
        grid = [steps - 1] + [round(i * step) for i in range(num_steps - 1, 0, -1)]
    elif spacing == "leading":
        if not 1 <= num_steps <= steps:
            raise ValueError(f"num_steps={num_steps}: leading spacing needs 1 <= num_steps <= {steps}")
        grid = [i * (steps // num_steps) for i in range(num_steps)][::-1]
    else:
        raise ValueError(f"spacing={spacing!r}: must be one of {TIMESTEP_SPACINGS}")
    return [int(t) for t in grid]


class DDPMProcess:
    """Discrete VP diffusion with T = ``cfg.num_train_timesteps`` steps; stateless after construction.
    Built by ``build_process`` from a validated ``ProcessConfig``.

    Attributes:
        num_train_timesteps: T.
        prediction_type: "epsilon" or "v_prediction" — what the network is trained to output.
        betas: float64 (T,).
        alphas_cumprod: float64 (T,), ᾱ_t = ∏_{s≤t} (1 - β_s).
        timestep_probs: float64 (T,) sampling distribution of training timesteps.

    With ``timestep_sampling="min_snr"`` training timesteps are drawn with probability ∝ the
    min-SNR-γ weight instead of weighting the loss, and ``loss`` stays **unweighted**: its expectation
    equals the min-SNR-weighted uniform loss divided by the constant mean weight, so gradients point
    the same way with lower variance (and a different overall scale).
    """

    def __init__(self, cfg: ProcessConfig) -> None:
        self.num_train_timesteps = cfg.num_train_timesteps
        self.prediction_type = cfg.prediction_type
        self.timestep_sampling = cfg.timestep_sampling
        self.betas = make_betas(cfg.beta_schedule, cfg.num_train_timesteps)  # (T,) float64
        self.alphas_cumprod = torch.cumprod(1 - self.betas, dim=0)  # (T,) float64
        if cfg.timestep_sampling == "min_snr":
            weights = min_snr_weights(self.alphas_cumprod, cfg.min_snr_gamma, cfg.prediction_type)
            self.timestep_probs = weights / weights.sum()
        else:
            self.timestep_probs = torch.full((self.num_train_timesteps,), 1 / self.num_train_timesteps,
                                             dtype=torch.float64)
        self._tables: dict[torch.device, Tensor] = {}  # alphas_cumprod per device, see _table_on
        self._abar = self.alphas_cumprod.tolist()  # python floats for the samplers' scalar math

    # -- schedule lookups ---------------------------------------------------------------------
    def alpha_bar(self, t: int) -> float:
        """ᾱ_t as a float64 Python number; t = -1 means clean data (ᾱ = 1)."""
        return 1.0 if t < 0 else self._abar[t]

    def _table_on(self, device: torch.device) -> Tensor:
        """ᾱ table on ``device``, copied once per device (not on every training step)."""
        if device not in self._tables:
            table = self.alphas_cumprod if device.type != "mps" else self.alphas_cumprod.float()
            self._tables[device] = table.to(device)
        return self._tables[device]

    def _coefficients(self, t: Tensor | int, x: Tensor) -> tuple[Tensor | float, Tensor | float]:
        """(√ᾱ_t, √(1-ᾱ_t)) for one step t (Python floats) or per sample for t (N,) int64, shaped
        (N, 1, ..., 1) in x's dtype. Computed in float64 first (float32 on MPS, which lacks float64)."""
        if not isinstance(t, Tensor) or t.dim() == 0:
            abar = self.alpha_bar(int(t))
            return math.sqrt(abar), math.sqrt(1 - abar)
        abar = self._table_on(t.device)[t]  # (N,)
        alpha = per_sample(abar.sqrt(), x).to(x.dtype)
        sigma = per_sample((1 - abar).sqrt(), x).to(x.dtype)
        return alpha, sigma

    # -- training -----------------------------------------------------------------------------
    def sample_timesteps(
        self, n: int, device: torch.device | str, generator: torch.Generator | None = None
    ) -> Tensor:
        """``n`` training timesteps, int64 (n,) on ``device``, from ``timestep_probs``.

        Drawn on the generator's device when one is given, else with ``device``'s global RNG.
        """
        where = draw_device(device, generator)
        if self.timestep_sampling == "uniform":
            t = torch.randint(0, self.num_train_timesteps, (n,), generator=generator, device=where)
        else:
            probs = self.timestep_probs.to(where)
            t = torch.multinomial(probs, n, replacement=True, generator=generator)
        return t.to(device)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x_t = √ᾱ_t · x0 + √(1-ᾱ_t) · ε for x0, noise (N, ...) and t (N,) int64; x0's dtype."""
        alpha, sigma = self._coefficients(t, x0)
        return alpha * x0 + sigma * noise

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """Training target (N, ...): ε for epsilon; v = √ᾱ_t·ε - √(1-ᾱ_t)·x0 for v_prediction."""
        if self.prediction_type == "epsilon":
            return noise
        alpha, sigma = self._coefficients(t, x0)
        return alpha * noise - sigma * x0

    def model_time(self, t: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """What the network's timestep embedder sees: the integer step t (N,) as float32 (or ``dtype``)."""
        return t.to(dtype)

    def predict_x0(self, model_output: Tensor, x_t: Tensor, t: Tensor | int) -> Tensor:
        """Data prediction x̂0 (N, ...) from the network output at timestep t ((N,) int64 or an int)."""
        alpha, sigma = self._coefficients(t, x_t)
        if self.prediction_type == "epsilon":
            return (x_t - sigma * model_output) / alpha
        return alpha * x_t - sigma * model_output

    def predict_eps(self, model_output: Tensor, x_t: Tensor, t: Tensor | int) -> Tensor:
        """Noise prediction ε̂ (N, ...) from the network output at timestep t ((N,) int64 or an int)."""
        if self.prediction_type == "epsilon":
            return model_output
        alpha, sigma = self._coefficients(t, x_t)
        return alpha * model_output + sigma * x_t

    def loss(self, denoise: Denoiser, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Per-sample training loss (N,): mean over non-batch dims of (denoise(x_t, t) - target)².

        Draws, in this order, t (``sample_timesteps``) and ε ~ N(0, I) like x0 from ``generator`` or
        the global RNG (deterministic once the trainer restores the RNG state). Unweighted, also
        under min-SNR sampling (see the class docstring). float32 (float64 for float64 x0).
        """
        t = self.sample_timesteps(x0.shape[0], x0.device, generator)  # (N,)
        noise = standard_normal(tuple(x0.shape), x0, generator)  # (N, ...)
        x_t = self.add_noise(x0, noise, t)
        output = denoise(x_t, self.model_time(t, time_dtype(x0)))
        return per_sample_mse(output, self.target(x0, noise, t))


def ddim_sample(
    process: DDPMProcess, denoise: Denoiser, x_T: Tensor, num_steps: int, spacing: str = "linspace"
) -> Tensor:
    """Deterministic DDIM (η = 0) from x_T (N, ...) ~ N(0, I) to x0 (N, ...), ``num_steps`` network calls.

    Each step moves to the next grid timestep s: x_s = √ᾱ_s·x̂0 + √(1-ᾱ_s)·ε̂; the last moves to
    clean data (ᾱ = 1), so it returns x̂0. ``spacing="leading"`` reproduces diffusers'
    ``DDIMScheduler(timestep_spacing="leading", set_alpha_to_one=True, clip_sample=False)`` (its
    default grid); the default ``"linspace"`` starts from T-1 and equals first-order DPM-Solver++.
    Works in x_T's dtype (use float32 or float64).
    """
    timesteps = inference_timesteps(process.num_train_timesteps, num_steps, spacing)
    x = x_T
    for i, t in enumerate(timesteps):
        prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        output = denoise(x, full_time(float(t), x))
        x0_hat = process.predict_x0(output, x, t)
        eps_hat = process.predict_eps(output, x, t)
        abar_prev = process.alpha_bar(prev)
        x = math.sqrt(abar_prev) * x0_hat + math.sqrt(1 - abar_prev) * eps_hat
    return x


def ddpm_sample(
    process: DDPMProcess,
    denoise: Denoiser,
    x_T: Tensor,
    num_steps: int,
    randn: RandnFn,
    spacing: str = "linspace",
) -> Tensor:
    """Ancestral DDPM sampling from x_T (N, ...) to x0 (N, ...), ``num_steps`` network calls.

    Each step from t to the next grid timestep s samples the posterior q(x_s | x_t, x̂0) of the
    strided chain: mean = √ᾱ_s·β/(1-ᾱ_t)·x̂0 + √(ᾱ_t/ᾱ_s)·(1-ᾱ_s)/(1-ᾱ_t)·x_t with β = 1 - ᾱ_t/ᾱ_s,
    variance (1-ᾱ_s)/(1-ᾱ_t)·β (diffusers' "fixed_small"). The last step goes to clean data, where
    the variance is 0, so it adds no noise and draws none.

    Args:
        randn: ``randn(x_T.shape[1:])`` -> (N, *shape) standard normal noise per sample (e.g.
            ``SampleNoise.randn``); called once per step except the last, cast to x's device/dtype.
            The caller may scale it (temperature).
        spacing: grid as in ``inference_timesteps``; ``"leading"`` reproduces diffusers'
            ``DDPMScheduler(clip_sample=False)`` default grid.
    """
    timesteps = inference_timesteps(process.num_train_timesteps, num_steps, spacing)
    x = x_T
    for i, t in enumerate(timesteps):
        prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        output = denoise(x, full_time(float(t), x))
        x0_hat = process.predict_x0(output, x, t)
        abar_t, abar_prev = process.alpha_bar(t), process.alpha_bar(prev)
        beta = 1 - abar_t / abar_prev  # β of the strided step t -> prev
        coef_x0 = math.sqrt(abar_prev) * beta / (1 - abar_t)
        coef_xt = math.sqrt(abar_t / abar_prev) * (1 - abar_prev) / (1 - abar_t)
        x = coef_x0 * x0_hat + coef_xt * x
        if prev >= 0:
            std = math.sqrt((1 - abar_prev) / (1 - abar_t) * beta)
            x = x + std * randn(tuple(x.shape[1:])).to(device=x.device, dtype=x.dtype)
    return x
