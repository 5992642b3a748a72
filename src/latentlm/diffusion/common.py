"""Small helpers shared by every process and sampler in this package.

A **denoiser** is any callable ``denoise(x_t, t) -> output`` where ``x_t`` is (N, ...) (the
LatentLM head uses (N, C) tokens, DiT uses (N, C, H, W) grids), ``t`` is a float tensor of shape
(N,) in *model time units* (what the network's timestep embedder sees: the integer DDPM step
0..T-1, or flow ``t * num_train_timesteps``), and ``output`` is the raw network prediction with
the shape of ``x_t`` (epsilon, v, or flow velocity, per the process).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Denoiser = Callable[[Tensor, Tensor], Tensor]
RandnFn = Callable[[tuple[int, ...]], Tensor]


def time_dtype(x: Tensor) -> torch.dtype:
    """Dtype of the timesteps fed to the network for samples ``x``.

    Never bf16/fp16: those lose integer precision above 256, so two DDPM steps would embed alike.
    float64 only when the samples themselves are float64 (tests against an oracle).
    """
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def working_dtype(x: Tensor) -> torch.dtype:
    """float32 for half-precision inputs, else the input's own dtype (loss and noise arithmetic)."""
    return torch.promote_types(x.dtype, torch.float32)


def per_sample(coef: Tensor, x: Tensor) -> Tensor:
    """Reshape per-sample coefficients (N,) to (N, 1, ..., 1) so they broadcast over ``x`` (N, ...)."""
    return coef.reshape(coef.shape[0], *([1] * (x.dim() - 1)))


def full_time(value: float, x: Tensor) -> Tensor:
    """The same model time ``value`` for every sample of ``x``: (N,) in ``time_dtype(x)``."""
    return torch.full((x.shape[0],), value, dtype=time_dtype(x), device=x.device)


def draw_device(device: torch.device | str, generator: torch.Generator | None) -> torch.device:
    """Where a random draw must happen: on the generator's device when one is given (torch requires
    it), else on ``device`` (the global RNG of that device, which the trainer checkpoints)."""
    return generator.device if generator is not None else torch.device(device)


def standard_normal(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """N(0, I) noise of ``shape`` with ``like``'s device and dtype, from ``generator`` or the global RNG.

    Drawn in ``working_dtype(like)`` (never in bf16) and then cast.
    """
    noise = torch.randn(
        shape, generator=generator, device=draw_device(like.device, generator), dtype=working_dtype(like)
    )
    return noise.to(device=like.device, dtype=like.dtype)


def per_sample_mse(output: Tensor, target: Tensor) -> Tensor:
    """Mean squared error per sample: (N, ...) x2 -> (N,), in at least float32 (bf16 outputs upcast)."""
    dtype = torch.promote_types(working_dtype(output), working_dtype(target))
    diff = output.to(dtype) - target.to(dtype)  # (N, ...)
    return diff.square().flatten(1).mean(dim=1)  # (N,)
