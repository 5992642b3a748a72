"""``latentlm plan-memory``: the per-GPU memory of a training setup, from ``latentlm.memory.plan_memory``.

Prints a markdown table (GiB per GPU: fp32 weights, gradients, AdamW moments, EMA, DDP buckets, autocast
copies or FSDP's gathered units, activations, workspace, the peak and what is left) with one row per
preset (``--model all``: every preset), and a last line saying which fit. No model is built, no GPU needed.
"""

from __future__ import annotations

from latentlm.config import ConfigError, PlanMemoryConfig
from latentlm.memory import MemoryPlan, format_plan, plan_memory
from latentlm.models.registry import get_config, list_models


def plans(cfg: PlanMemoryConfig) -> list[MemoryPlan]:
    """One plan per requested preset; ``ConfigError`` for an unknown preset or an impossible split."""
    cfg.validate()
    names = list_models() if cfg.model == "all" else [cfg.model]
    if cfg.model != "all" and cfg.model not in list_models():
        raise ConfigError(f"model={cfg.model}: unknown preset; choose 'all' or one of: {', '.join(list_models())}")
    return [plan_memory(get_config(name), cfg.gpus, cfg.batch_size, cfg.grad_accum_steps, cfg.strategy,
                        cfg.activation_checkpointing, cfg.mixed_precision, cfg.gpu_memory_gb) for name in names]


def run(cfg: PlanMemoryConfig) -> int:
    """Exit code 0 when every planned setup fits, 1 when one does not."""
    planned = plans(cfg)
    print(f"per GPU, GiB: batch {cfg.batch_size} on {cfg.gpus} GPU(s) of {cfg.gpu_memory_gb:g} GiB, "
          f"{cfg.grad_accum_steps} micro-step(s), {cfg.mixed_precision}, {cfg.strategy}"
          f"{', activation checkpointing' if cfg.activation_checkpointing else ''}")
    print(format_plan(planned))
    fit = [p.model for p in planned if p.fits]
    print(f"fits: {', '.join(fit) or 'none'}" + (f"; does not fit: {', '.join(p.model for p in planned if not p.fits)}"
                                                 if len(fit) < len(planned) else ""))
    return 0 if len(fit) == len(planned) else 1
