"""Diffusion and flow processes (training targets) and samplers (noise -> latents).

Processes share one stateless contract — ``sample_timesteps``, ``add_noise``, ``target``,
``model_time``, ``predict_x0``, ``predict_eps``, ``loss`` — and samplers are pure functions
``sampler(process, denoise, x_T, num_steps, ...) -> x0`` over tensors of any shape (N, ...), so the
LatentLM head's (N, C) tokens and DiT's (N, C, H, W) grids use the same code. See ``common.py`` for
the denoiser convention (timesteps in model time units, float32, never bf16).
"""

from __future__ import annotations

from torch import Tensor

from latentlm.config import ProcessConfig, SamplerConfig
from latentlm.diffusion.common import Denoiser, RandnFn
from latentlm.diffusion.ddpm import DDPMProcess, ddim_sample, ddpm_sample, inference_timesteps
from latentlm.diffusion.dpm_solver import dpm_solver_sample
from latentlm.diffusion.flow import FlowProcess, euler_sample, flow_time_grid, heun_sample
from latentlm.diffusion.guidance import guidance_combine, guidance_scale_at

Process = DDPMProcess | FlowProcess


def build_process(cfg: ProcessConfig) -> Process:
    """The process ``cfg.kind`` names ("ddpm" or "flow"); ``ConfigError`` for an invalid config."""
    cfg.validate()
    return DDPMProcess(cfg) if cfg.kind == "ddpm" else FlowProcess(cfg)


def sample(
    process: Process, denoise: Denoiser, x_T: Tensor, cfg: SamplerConfig, randn: RandnFn | None = None
) -> Tensor:
    """Run the sampler ``cfg.sampler`` from x_T (N, ...) to x0 (N, ...).

    ``cfg`` must have passed ``SamplerConfig.validate`` for this process (``generate`` does that once
    per call; solvers run once per token and trust it). ``x_T`` is the caller's initial noise, already
    scaled by ``cfg.temperature`` (this function applies no temperature). ``randn`` (see
    ``ddpm_sample``) is required by the ``ddpm`` sampler only; the caller scales it for temperature.
    Guidance lives in ``denoise`` (see ``guidance_combine``).
    """
    if isinstance(process, FlowProcess):
        if cfg.sampler == "euler":
            return euler_sample(process, denoise, x_T, cfg.num_steps)
        return heun_sample(process, denoise, x_T, cfg.num_steps)
    if cfg.sampler == "dpm_solver":
        return dpm_solver_sample(process, denoise, x_T, cfg.num_steps, cfg.solver_order)
    if cfg.sampler == "ddim":
        return ddim_sample(process, denoise, x_T, cfg.num_steps)
    if randn is None:
        raise ValueError("sampler='ddpm' draws noise every step: pass randn (e.g. SampleNoise(...).randn)")
    return ddpm_sample(process, denoise, x_T, cfg.num_steps, randn)


def evaluation_times(process: Process, cfg: SamplerConfig) -> list[float]:
    """The model times at which ``sample(process, denoise, x_T, cfg)`` calls ``denoise``, in call order.

    Every sampler here evaluates the network on a grid fixed by (process, cfg) alone, so what depends
    only on t (the head's timestep embeddings) can be computed once per solve, or once per ``generate``
    call, and looked up by call number (``LatentLM``'s fused solve). DPM-Solver++, DDIM and DDPM: the
    ``linspace`` grid (DPM-Solver++'s final first-order step evaluates its last point again: once per
    grid point in all). Euler: t_0..t_{S-1}; Heun: t_i, then t_{i+1} for the corrector, per step.
    ``tests/test_diffusion.py`` pins this against the times each sampler actually passes.
    """
    if isinstance(process, FlowProcess):
        grid = [t * process.num_train_timesteps for t in flow_time_grid(cfg.num_steps)]
        if cfg.sampler == "euler":
            return grid[:-1]
        return [t for pair in zip(grid[:-1], grid[1:], strict=True) for t in pair]
    return [float(t) for t in inference_timesteps(process.num_train_timesteps, cfg.num_steps, "linspace")]


__all__ = [
    "DDPMProcess",
    "Denoiser",
    "FlowProcess",
    "Process",
    "build_process",
    "ddim_sample",
    "ddpm_sample",
    "dpm_solver_sample",
    "euler_sample",
    "evaluation_times",
    "guidance_combine",
    "guidance_scale_at",
    "heun_sample",
    "inference_timesteps",
    "sample",
]
