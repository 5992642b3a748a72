"""The fused generation path (``SamplerConfig.fused``) samples what the reference path samples.

The fused path reorganises each token's solve (``FusedHeadSolve``: timestep embeddings once per call,
all modulations of a solve in one matmul) and runs it and the KV-cached backbone step through
``torch.compile`` on fixed buffers (captured as CUDA graphs on a GPU). Without the compiler it differs
from the reference only in the shapes of three matmuls; Inductor also reorders float reductions. So
both are pinned to float32 rounding against the reference path, for every deterministic sampler, with
and without guidance, for p = 1 and 2 and for grouped-query attention. Compiling takes ~10 s per graph
on 2 CPU cores, so the uncompiled fused path covers the whole grid and the compiler a cross-section.
"""

from __future__ import annotations

import pytest
import torch

import latentlm.models.dit as dit_module
import latentlm.models.latentlm as latentlm_module
from latentlm import SamplerConfig, build_model
from latentlm.config import ConfigError
from latentlm.diffusion import sample
from latentlm.models.generation import FusedHeadSolve, guided_denoiser, start_generation

TINY = dict(depth=2, hidden_size=64, num_heads=4, head_depth=2, in_channels=4, input_size=4, num_classes=10)
MODELS = {"mha": {}, "gqa": {"num_kv_heads": 2}, "p2": {"patch_size": 2, "input_size": 8}}
SAMPLERS = {
    "dpm2": ("ddpm", dict(sampler="dpm_solver", solver_order=2)),
    "dpm1": ("ddpm", dict(sampler="dpm_solver", solver_order=1)),
    "ddim": ("ddpm", dict(sampler="ddim")),
    "euler": ("flow", dict(sampler="euler")),
    "heun": ("flow", dict(sampler="heun")),
}
GUIDANCE = {"none": dict(cfg_scale=1.0), "cfg": dict(cfg_scale=2.5),
            "linear": dict(cfg_scale=2.5, cfg_schedule="linear")}
LABELS = torch.tensor([4, 2, 10])  # includes the null class


def model_for(kind: str, name: str = "Transformer-Tiny", **overrides) -> torch.nn.Module:
    """A tiny model whose head output is not zero (a fresh head predicts exactly 0)."""
    torch.manual_seed(0)
    model = build_model(name, **{**TINY, "process": {"kind": kind}, **overrides}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def both_paths(model, sampler: dict, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    reference = model.generate(LABELS, SamplerConfig(num_steps=4, fused="off", **sampler), seed=seed, static=False)
    fused = model.generate(LABELS, SamplerConfig(num_steps=4, fused="on", **sampler), seed=seed)
    return reference, fused


@pytest.fixture
def no_compiler(monkeypatch):
    """The fused path with ``torch.compile`` left out (the compiled tests below add it back)."""
    monkeypatch.setattr(latentlm_module, "compiled", lambda fn, fullgraph=True: fn)


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("guidance", list(GUIDANCE))
@pytest.mark.parametrize("sampler_name", list(SAMPLERS))
def test_fused_generation_equals_reference(no_compiler, sampler_name, guidance, model_name):
    kind, sampler = SAMPLERS[sampler_name]
    reference, fused = both_paths(model_for(kind, **MODELS[model_name]), {**sampler, **GUIDANCE[guidance]})
    assert reference.abs().max() > 0.1  # a real sample, not zeros
    assert (reference - fused).abs().max().item() < 2e-6


@pytest.mark.parametrize("sampler_name", list(SAMPLERS))
def test_fused_solve_of_one_token_equals_the_reference_solve(sampler_name):
    """One token's solve on its own (no autoregression to carry differences on)."""
    kind, sampler = SAMPLERS[sampler_name]
    model = model_for(kind)
    setup = start_generation(model, LABELS, SamplerConfig(num_steps=7, cfg_scale=3.0, **sampler), 0, None)
    cond = torch.randn(2 * len(LABELS), 64, generator=torch.Generator().manual_seed(1))  # (B, D)
    x_T = setup.randn((model.config.token_dim,))  # (N, C)
    with torch.no_grad():
        denoise = guided_denoiser(lambda x_t, t: model.head(x_t, t, cond), 3.0, True)
        reference = sample(model.process, denoise, x_T, setup.sampler)
        fused = FusedHeadSolve(model.head, model.process, setup)(x_T, cond, 3.0)
    assert reference.abs().max() > 0.1
    assert (reference - fused).abs().max().item() < 1e-6


def test_fused_switch_is_checked():
    model = model_for("ddpm")
    with pytest.raises(ConfigError, match="fused='on' needs a deterministic sampler"):
        model.generate(LABELS, SamplerConfig(sampler="ddpm", fused="on"))
    with pytest.raises(ConfigError, match="sampler.fused='yes'"):
        model.generate(LABELS, SamplerConfig(fused="yes"))
    with pytest.raises(ValueError, match="static=False cannot be fused"):
        model.generate(LABELS, SamplerConfig(fused="on"), static=False)
    assert SamplerConfig().fused_on("cuda") and not SamplerConfig().fused_on("cpu")
    assert not SamplerConfig(sampler="ddpm").fused_on("cuda") and SamplerConfig(fused="on").fused_on("cpu")
    assert not SamplerConfig(fused="off").fused_on("cuda")


# -- torch.compile ------------------------------------------------------------------------------

COMPILED = [  # (sampler, guidance, model): every sampler once, each model, guided and not
    ("dpm2", "linear", "gqa"),
    ("dpm1", "none", "gqa"),
    ("ddim", "cfg", "mha"),
    ("euler", "none", "p2"),
    ("heun", "cfg", "p2"),
]


@pytest.mark.slow  # ~2 minutes on 2 CPU cores: nine Inductor compilations of small graphs
def test_compiled_generation_equals_eager():
    torch.compiler.reset()
    for sampler_name, guidance, model_name in COMPILED:
        kind, sampler = SAMPLERS[sampler_name]
        model = model_for(kind, **MODELS[model_name])
        reference, fused = both_paths(model, {**sampler, **GUIDANCE[guidance]})
        assert reference.abs().max() > 0.1
        diff = (reference - fused).abs().max().item()
        assert diff < 1e-5, (sampler_name, guidance, model_name, diff)
        again = model.generate(LABELS, SamplerConfig(num_steps=4, fused="on", **sampler, **GUIDANCE[guidance]), seed=3)
        assert torch.equal(again, fused)  # the compiled graphs are reused and deterministic


@pytest.mark.slow  # one Inductor compilation of DiT's denoiser
def test_compiled_dit_generation_equals_eager():
    model = model_for("ddpm", "DiT-Tiny")
    compiled_calls = []
    real = dit_module.compiled
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dit_module, "compiled", lambda fn: compiled_calls.append(fn) or real(fn))
        reference = model.generate(LABELS, SamplerConfig(num_steps=4, cfg_scale=2.5, fused="off"), seed=3)
        fused = model.generate(LABELS, SamplerConfig(num_steps=4, cfg_scale=2.5, fused="on"), seed=3)
    assert len(compiled_calls) == 1 and reference.abs().max() > 0.1
    assert (reference - fused).abs().max().item() < 1e-5
