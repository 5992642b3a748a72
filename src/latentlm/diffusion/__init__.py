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
from latentlm.diffusion.dpm_solver import DPM_SOLVER_ORDERS, dpm_solver_sample
from latentlm.diffusion.flow import FlowProcess, euler_sample, heun_sample
from latentlm.diffusion.guidance import cfg_combine, cfg_scale_at
from latentlm.diffusion.noise import SampleNoise

Process = DDPMProcess | FlowProcess

PROCESS_KINDS = ("ddpm", "flow")
SAMPLERS = {"ddpm": ("dpm_solver", "ddim", "ddpm"), "flow": ("euler", "heun")}


def build_process(cfg: ProcessConfig) -> Process:
    """The process ``cfg.kind`` names ("ddpm" or "flow"), validated."""
    if cfg.kind == "ddpm":
        return DDPMProcess(cfg)
    if cfg.kind == "flow":
        return FlowProcess(cfg)
    raise ValueError(f"ProcessConfig.kind={cfg.kind!r}: must be one of {PROCESS_KINDS}")


def check_sampler(process: Process, cfg: SamplerConfig) -> None:
    """Raise ``ValueError`` naming the bad SamplerConfig value and what is allowed for ``process``.

    Cheap; models may call it before running the backbone so a bad config fails fast.
    """
    kind = "flow" if isinstance(process, FlowProcess) else "ddpm"
    if cfg.sampler not in SAMPLERS[kind]:
        raise ValueError(f"sampler={cfg.sampler!r} does not fit a {kind} process; allowed: {SAMPLERS[kind]}")
    if cfg.num_steps < 1:
        raise ValueError(f"num_steps={cfg.num_steps}: must be >= 1")
    if cfg.solver_order not in DPM_SOLVER_ORDERS:
        raise ValueError(f"solver_order={cfg.solver_order}: must be one of {DPM_SOLVER_ORDERS}")


def sample(
    process: Process, denoise: Denoiser, x_T: Tensor, cfg: SamplerConfig, randn: RandnFn | None = None
) -> Tensor:
    """Run the sampler ``cfg.sampler`` from x_T (N, ...) to x0 (N, ...).

    ``x_T`` is the caller's initial noise, already scaled by ``cfg.temperature`` (this function
    applies no temperature). ``randn`` (see ``ddpm_sample``) is required by the ``ddpm`` sampler only;
    the caller scales it for temperature. Guidance lives in ``denoise`` (see ``cfg_combine``).
    """
    check_sampler(process, cfg)
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


__all__ = [
    "DDPMProcess",
    "Denoiser",
    "FlowProcess",
    "Process",
    "SampleNoise",
    "build_process",
    "cfg_combine",
    "cfg_scale_at",
    "check_sampler",
    "ddim_sample",
    "ddpm_sample",
    "dpm_solver_sample",
    "euler_sample",
    "heun_sample",
    "inference_timesteps",
    "sample",
]
