"""Analytic FLOP counts equal torch's FlopCounterMode on tiny LatentLM and DiT models, training and generation."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from latentlm import SamplerConfig, get_config, model_from_config
from latentlm.flops import (
    denoiser_calls,
    generation_breakdown,
    mfu,
    peak_tflops,
    training_breakdown,
    training_flops,
)

aten = torch.ops.aten

# CPU SDPA runs aten._scaled_dot_product_flash_attention_for_cpu(_backward), which has no FLOP formula
# (FlopCounterMode counts it as 0). Mapping it to torch's own formulas for the CUDA SDPA kernels shows
# what a GPU run counts. ``__wrapped__``: the raw formulas (custom_mapping wraps them in shapes itself).
CUDA_SDPA_RULES = {
    aten._scaled_dot_product_flash_attention_for_cpu:
        flop_registry[aten._scaled_dot_product_flash_attention].__wrapped__,
    aten._scaled_dot_product_flash_attention_for_cpu_backward:
        flop_registry[aten._scaled_dot_product_flash_attention_backward].__wrapped__,
}

BASE = dict(in_channels=4, input_size=8, num_classes=10, depth=2, hidden_size=64, num_heads=4, head_depth=2)
CASES = {
    "latentlm-mha-p1-m4": ("Transformer-Tiny", dict(batch_mul=4)),
    "latentlm-gqa-p2-m1": ("Transformer-Tiny", dict(num_kv_heads=2, patch_size=2, batch_mul=1, ffn_hidden_size=96,
                                                    head_ffn_hidden_size=32)),  # a head narrower than the backbone
    "latentlm-mqa-p1-m2": ("Transformer-Tiny", dict(num_kv_heads=1, batch_mul=2)),
    "dit-mha-p1": ("DiT-Tiny", {}),
    "dit-gqa-p2": ("DiT-Tiny", dict(num_kv_heads=2, patch_size=2)),
}


def build(case: str, **extra):
    name, overrides = CASES[case]
    cfg = get_config(name, **{**BASE, **overrides, **extra})
    torch.manual_seed(0)
    return cfg, model_from_config(cfg)


def count(fn, mapping=None) -> int:
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("case", list(CASES))
def test_training_flops_equal_flop_counter(case):
    cfg, model = build(case)
    latents, labels = torch.randn(3, 4, 8, 8), torch.randint(0, 10, (3,))
    parts = training_breakdown(cfg, 3)
    # As counted on this CPU: matmuls only (SDPA is uncounted here) ...
    assert count(lambda: model(latents, labels).backward()) == parts.matmul
    # ... and as torch's SDPA formulas count attention on a GPU: the whole analytic count.
    assert count(lambda: model(latents, labels).backward(), CUDA_SDPA_RULES) == parts.total == training_flops(cfg, 3)
    assert parts.attention > 0


def test_breakdown_phases_and_components_add_up():
    cfg, _ = build("latentlm-mha-p1-m4")
    parts = training_breakdown(cfg, 2)
    assert parts.forward + parts.backward == parts.matmul + parts.attention == parts.total
    assert sum(parts.components().values()) == parts.total
    assert list(parts.components()) == ["embed", "backbone", "condition", "head"]
    attention = [t for t in parts.terms if t.kind == "attention"]
    assert all(2 * t.backward == 5 * t.forward for t in attention)  # SDPA backward: 5 matmuls vs 2
    # Backward of a Linear is 2x forward, 1x where its input is data (no input gradient).
    matmul_fwd = sum(t.forward for t in parts.terms if t.kind == "matmul")
    matmul_bwd = sum(t.backward for t in parts.terms if t.kind == "matmul")
    assert matmul_fwd < matmul_bwd < 2 * matmul_fwd
    assert training_flops(cfg, 6) == 3 * training_flops(cfg, 2)  # linear in the batch
    assert "GFLOP" in parts.summary()


def test_head_runs_on_batch_mul_copies():
    cfg1, _ = build("latentlm-mha-p1-m4", batch_mul=1)
    cfg4, _ = build("latentlm-mha-p1-m4", batch_mul=4)
    head1 = training_breakdown(cfg1, 2).components()["head"]
    head4 = training_breakdown(cfg4, 2).components()["head"]
    assert head4 == 4 * head1
    assert training_breakdown(cfg1, 2).components()["backbone"] == training_breakdown(cfg4, 2).components()["backbone"]


@pytest.mark.parametrize("guided", [False, True], ids=["unguided", "cfg"])
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_latentlm_generation_flops_equal_flop_counter(guided, static):
    cfg, model = build("latentlm-gqa-p2-m1", input_size=4)  # L = 4 tokens: generation stays fast
    model.eval()
    labels = torch.tensor([1, 2])
    sampler = SamplerConfig(num_steps=3, cfg_scale=3.0 if guided else 1.0)
    parts = generation_breakdown(cfg, denoiser_calls(sampler), guided, static)
    assert count(lambda: model.generate(labels, sampler, static=static)) == 2 * parts.matmul
    assert count(lambda: model.generate(labels, sampler, static=static), CUDA_SDPA_RULES) == 2 * parts.total
    assert parts.backward == 0


@pytest.mark.parametrize("guided", [False, True], ids=["unguided", "cfg"])
def test_dit_generation_flops_equal_flop_counter(guided):
    cfg, model = build("dit-mha-p1")
    model.eval()
    labels = torch.tensor([1, 2, 3])
    sampler = SamplerConfig(num_steps=2, cfg_scale=3.0 if guided else 1.0)
    parts = generation_breakdown(cfg, denoiser_calls(sampler), guided)
    assert count(lambda: model.generate(labels, sampler), CUDA_SDPA_RULES) == 3 * parts.total


def test_heun_counts_two_denoiser_calls_per_step():
    cfg, model = build("dit-gqa-p2", process=dict(kind="flow"))
    model.eval()
    sampler = SamplerConfig(sampler="heun", num_steps=2)
    assert denoiser_calls(sampler) == 4
    parts = generation_breakdown(cfg, denoiser_calls(sampler), guided=False)
    assert count(lambda: model.generate(torch.tensor([0]), sampler), CUDA_SDPA_RULES) == parts.total


def test_generation_guidance_doubles_and_steps_scale_the_head():
    cfg, _ = build("latentlm-mha-p1-m4")
    one = generation_breakdown(cfg, 10, guided=False)
    assert generation_breakdown(cfg, 10, guided=True).total == 2 * one.total
    more = generation_breakdown(cfg, 20, guided=False).components()
    assert more["head"] == 2 * one.components()["head"] and more["backbone"] == one.components()["backbone"]


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.5), ("NVIDIA H100 NVL", 835.5),
    ("NVIDIA H200", 989.4), ("NVIDIA GH200 480GB", 989.4), ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0), ("NVIDIA L40S", 362.05), ("NVIDIA L40", 181.05), ("NVIDIA L4", 121.0),
    ("NVIDIA A10", 125.0), ("NVIDIA A10G", None), ("Tesla V100-SXM2-16GB", None), ("cpu", None),
])
def test_peak_tflops(name, peak):
    assert peak_tflops(name) == peak


def test_mfu():
    assert mfu(989.4e12, 2.0, "NVIDIA H100 80GB HBM3", gpus=2) == pytest.approx(0.25)
    assert mfu(1e12, 1.0, "some unknown card") is None


@pytest.mark.parametrize("module", ["flops.py", "memory.py"])
def test_formulas_import_no_torch(module):
    """The formulas are plain arithmetic on a ModelConfig: no torch at module level."""
    tree = ast.parse((Path(__file__).parents[1] / "src" / "latentlm" / module).read_text())
    top = [node for node in tree.body if isinstance(node, ast.Import | ast.ImportFrom)]
    names = [alias.name for node in top for alias in node.names] + [
        node.module for node in top if isinstance(node, ast.ImportFrom) and node.module]
    assert not [n for n in names if n.split(".")[0] == "torch"]
