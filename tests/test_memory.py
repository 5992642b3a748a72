"""Memory planner: parameter counts equal the models', the activation formula matches the bytes autograd
saves on tiny CPU models (fp32, bf16 autocast, bf16 weights; with and without per-block checkpointing),
and the plans for the large presets come out as expected."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from latentlm import get_config, list_models, model_from_config
from latentlm.memory import (
    GiB,
    activation_bytes,
    format_plan,
    param_counts,
    plan_memory,
    saved_tensor_bytes,
)

# Stated tolerance of the activation formula against the measured saved bytes. On these models the
# formula is in fact exact; the margin is for torch versions that save a tensor more or less.
TOLERANCE = 0.10

BASE = dict(in_channels=4, input_size=8, num_classes=10, hidden_size=64, num_heads=4, ffn_hidden_size=96, depth=2)
CASES = {
    "latentlm-mha-p1-m2": ("Transformer-Tiny", dict(head_depth=2, batch_mul=2)),
    "latentlm-gqa-p2-m4": ("Transformer-Tiny", dict(num_kv_heads=2, patch_size=2, batch_mul=4)),
    "latentlm-narrow-head": ("Transformer-Tiny", dict(head_depth=2, batch_mul=2, head_ffn_hidden_size=64)),
    "dit-mha-p1": ("DiT-Tiny", {}),
    "dit-mqa-p2": ("DiT-Tiny", dict(num_kv_heads=1, patch_size=2)),
}
MODES = ("fp32", "autocast-bf16", "bf16-weights")


@pytest.mark.parametrize("name,extra", [(name, {}) for name in list_models()]
                         + [("Transformer-Medium", {"head_ffn_hidden_size": 1024})])  # a MAR-sized head
def test_param_counts_equal_the_models(name, extra):
    cfg = get_config(name, **extra)
    with torch.device("meta"):  # no memory: the 3B presets are built in milliseconds
        model = model_from_config(cfg)
    counts = param_counts(cfg)
    assert counts.total == sum(p.numel() for p in model.parameters())
    assert counts.block == sum(p.numel() for p in model.blocks[0].parameters())
    if cfg.family == "latentlm":
        assert counts.head_block == sum(p.numel() for p in model.head.blocks[0].parameters())


def checkpoint_every_block(model: torch.nn.Module) -> None:
    """Wrap every backbone block and every head block in non-reentrant activation checkpointing."""
    blocks = list(model.blocks) + (list(model.head.blocks) if hasattr(model, "head") else [])
    for block in blocks:
        block.forward = (lambda f: lambda *args: checkpoint(f, *args, use_reentrant=False))(block.forward)


@pytest.mark.parametrize("ac", [False, True], ids=["full", "checkpointed"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(CASES))
def test_activation_formula_matches_saved_tensors(case, mode, ac):
    name, overrides = CASES[case]
    cfg = get_config(name, **{**BASE, **overrides})
    torch.manual_seed(0)
    model = model_from_config(cfg)
    if mode == "bf16-weights":
        model = model.to(torch.bfloat16)
    if ac:
        checkpoint_every_block(model)
    latents, labels = torch.randn(3, 4, 8, 8), torch.randint(0, 10, (3,))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if mode == "autocast-bf16" else contextlib.nullcontext()
    with autocast:
        measured = saved_tensor_bytes(model, lambda: model(latents, labels))
    # CPU SDPA returns LatentLM's rotary attention output (B, H, T, hd)-contiguous, so the reshape before
    # the output projection copies it; CUDA kernels return (B, T, H, hd) memory (the planner's default).
    formula = activation_bytes(cfg, 3, "no" if mode == "fp32" else "bf16", ac, autocast=mode != "bf16-weights",
                               attention_out_copy=cfg.family == "latentlm")
    assert formula.saved == pytest.approx(measured.activations, rel=TOLERANCE)
    # Autocast's saved bf16 weight casts: the planner's DDP "copies" line.
    counts = param_counts(cfg)
    if mode != "autocast-bf16":
        assert measured.weight_copies == 0
    else:  # checkpointed blocks re-cast their weights when recomputed, after forward
        casts = counts.root_saved_casts + (0 if ac else cfg.depth * counts.block + cfg.head_depth * counts.head_block)
        assert measured.weight_copies == 2 * casts


def test_checkpointing_keeps_block_inputs_only():
    cfg = get_config("Transformer-3B")
    full = activation_bytes(cfg, 32)
    ac = activation_bytes(cfg, 32, activation_checkpointing=True)
    T = 32 * cfg.seq_len
    assert ac.blocks == cfg.depth * T * cfg.hidden_size * 4  # fp32 residual stream under autocast
    assert ac.recompute == max(full.blocks // cfg.depth, full.head_blocks // cfg.head_depth)
    assert ac.stem == full.stem and ac.total < full.total / 4


def test_ddp_state_is_24_bytes_per_param_and_fsdp_shards_it():
    cfg = get_config("Transformer-Large")
    P = param_counts(cfg).total
    ddp = plan_memory(cfg, gpus=8, batch_size=256, strategy="ddp")
    assert (ddp.weights, ddp.gradients, ddp.optimizer, ddp.ema, ddp.buffers) == (4 * P, 4 * P, 8 * P, 4 * P, 4 * P)
    fsdp = plan_memory(cfg, gpus=8, batch_size=256, strategy="fsdp")
    assert fsdp.weights + fsdp.gradients + fsdp.optimizer + fsdp.ema == pytest.approx(20 * P / 8, rel=1e-6)
    assert fsdp.buffers == 0 and fsdp.activations == ddp.activations
    assert fsdp.peak == fsdp.state + fsdp.weight_copies + fsdp.activations + fsdp.workspace
    # The micro-batch is per process and per accumulation step: halving it roughly halves activations.
    half = plan_memory(cfg, gpus=8, batch_size=256, grad_accum_steps=2, strategy="fsdp")
    assert half.micro_batch == 16 and half.activations < 0.55 * fsdp.activations


def test_transformer_3b_trains_on_8_80gb_gpus_only_with_fsdp():
    cfg = get_config("Transformer-3B")
    assert param_counts(cfg).total == pytest.approx(3.68e9, rel=0.01)
    plans = {(s, ac): plan_memory(cfg, 8, 256, strategy=s, activation_checkpointing=ac)
             for s in ("ddp", "fsdp") for ac in (False, True)}
    assert not plans["ddp", False].fits and not plans["ddp", True].fits  # 24 B/param alone is 82 GiB
    assert plans["fsdp", False].fits and plans["fsdp", True].fits
    assert plans["fsdp", True].headroom > 40 * GiB
    table = format_plan(list(plans.values()))
    assert table.count("\n") == 5 and "Transformer-3B" in table and "| fsdp x8 | yes |" in table


def test_bad_plans_raise_naming_the_value():
    cfg = get_config("Transformer-Tiny")
    with pytest.raises(ValueError, match="batch_size=100"):
        plan_memory(cfg, gpus=8, batch_size=100)
    with pytest.raises(ValueError, match="strategy='zero3'"):
        plan_memory(cfg, gpus=8, batch_size=256, strategy="zero3")
    with pytest.raises(ValueError, match="mixed_precision='fp8'"):
        plan_memory(cfg, gpus=8, batch_size=256, mixed_precision="fp8")
