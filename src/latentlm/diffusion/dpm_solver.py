"""DPM-Solver++ multistep (Lu et al. 2022, arXiv 2211.01095): data prediction, order 1 or 2.

Works in half-log-SNR time λ = log(α/σ) with α = √ᾱ, σ = √(1-ᾱ). With x̂0 the data prediction at
the current grid point s and h = λ_next - λ_s, one step is

    order 1:  x_next = (σ_next/σ_s)·x - α_next·(e^{-h} - 1)·x̂0_s                (= DDIM)
    order 2:  ... - ½·α_next·(e^{-h} - 1)·D1,  D1 = (x̂0_s - x̂0_prev)·h/h_prev  (midpoint form)

Settings reproduced from diffusers' ``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++",
solver_type="midpoint", timestep_spacing="linspace", lower_order_final=True, final_sigmas_type="zero")``:
the first step is first order (no history yet); the last step is first order towards σ = 0, where
the update reduces exactly to x_next = x̂0 (diffusers makes the last step first order for any step
count once the final sigma is zero, so ``lower_order_final``'s "< 15 steps" clause only matters for
order 3, which is not offered). ``euler_at_final`` then changes nothing either.
"""

from __future__ import annotations

import math
from itertools import pairwise

from torch import Tensor

from latentlm.diffusion.common import Denoiser, full_time
from latentlm.diffusion.ddpm import DDPMProcess, inference_timesteps

DPM_SOLVER_ORDERS = (1, 2)


def dpm_solver_sample(
    process: DDPMProcess, denoise: Denoiser, x_T: Tensor, num_steps: int = 20, order: int = 2
) -> Tensor:
    """Sample x0 (N, ...) from x_T (N, ...) ~ N(0, I) with ``num_steps`` network calls.

    Timesteps: ``inference_timesteps(T, num_steps, "linspace")`` (starting at T-1). Coefficients are
    float64 Python numbers; tensor arithmetic runs in x_T's dtype (use float32, or float64 for tests),
    and a bf16 network output is promoted to it.
    """
    if order not in DPM_SOLVER_ORDERS:
        raise ValueError(f"order={order}: DPM-Solver++ here supports orders {DPM_SOLVER_ORDERS}")
    timesteps = inference_timesteps(process.num_train_timesteps, num_steps, "linspace")

    def alpha_sigma_lambda(t: int) -> tuple[float, float, float]:
        abar = process.alpha_bar(t)
        alpha, sigma = math.sqrt(abar), math.sqrt(1 - abar)
        return alpha, sigma, math.log(alpha) - math.log(sigma)

    x = x_T
    # Multistep history: the previous data prediction and its λ (locals of this loop, not state).
    prev_x0_hat: Tensor | None = None
    prev_lambda = 0.0
    for t, t_next in pairwise(timesteps):
        output = denoise(x, full_time(float(t), x))
        x0_hat = process.predict_x0(output, x, t)
        _, sigma_s, lambda_s = alpha_sigma_lambda(t)
        alpha_next, sigma_next, lambda_next = alpha_sigma_lambda(t_next)
        h = lambda_next - lambda_s
        phi = alpha_next * math.expm1(-h)  # α_next·(e^{-h} - 1), < 0
        x_next = (sigma_next / sigma_s) * x - phi * x0_hat
        if order == 2 and prev_x0_hat is not None:
            r = (lambda_s - prev_lambda) / h  # h_prev / h
            x_next = x_next - (0.5 * phi / r) * (x0_hat - prev_x0_hat)
        x, prev_x0_hat, prev_lambda = x_next, x0_hat, lambda_s
    # Final step to σ = 0 (λ = ∞): the first-order update is exactly x̂0 at the last grid point.
    t = timesteps[-1]
    return process.predict_x0(denoise(x, full_time(float(t), x)), x, t)
