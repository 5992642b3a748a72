"""Models: KV cache vs teacher forcing, causality, parameter counts, init, generation contracts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from latentlm import SamplerConfig, build_model, get_config, list_models, model_from_config
from latentlm.config import ModelConfig, from_dict, to_dict
from latentlm.diffusion import guidance_scale_at, sample
from latentlm.models.generation import guided_denoiser, start_generation
from latentlm.models.layers import patchify, sincos_2d, unpatchify

TINY = dict(depth=2, hidden_size=64, num_heads=4, head_depth=2, in_channels=4, input_size=4, num_classes=10)


def tiny(name: str = "Transformer-Tiny", **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(name, **{**TINY, **overrides}).eval()


def conditions_both_ways(model, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced conditions (N, L, D) and KV-cached recurrent conditions (N, L, D)."""
    model = model.to(dtype)
    cfg = model.config
    g = torch.Generator().manual_seed(1)
    tokens = torch.randn(3, cfg.seq_len, cfg.token_dim, generator=g, dtype=dtype)
    labels = torch.tensor([0, 5, cfg.num_classes])  # includes the null class
    with torch.no_grad():
        parallel = model.forward_parallel(tokens, labels)
        caches = model.new_cache(3, tokens.device, dtype)
        steps = [model.forward_recurrent(labels, 0, caches)]
        for i in range(1, cfg.seq_len):
            steps.append(model.forward_recurrent(tokens[:, i - 1], i, caches))
    return parallel, torch.stack(steps, dim=1)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"num_kv_heads": 2}, {"num_kv_heads": 1}, {"patch_size": 2, "input_size": 8}],
    ids=["mha", "gqa2", "mqa", "patch2"],
)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)], ids=["f64", "f32"])
def test_kv_cache_equals_teacher_forcing(overrides, dtype, tol):
    parallel, recurrent = conditions_both_ways(tiny(**overrides), dtype)
    assert parallel.shape == recurrent.shape == (3, 16, 64)
    assert (parallel - recurrent).abs().max().item() < tol


def test_causality_perturbing_token_j_changes_only_later_positions():
    model = tiny().double()
    cfg = model.config
    tokens = torch.randn(2, cfg.seq_len, cfg.token_dim, dtype=torch.float64)
    labels = torch.tensor([1, 2])
    j = 6
    perturbed = tokens.clone()
    perturbed[:, j] += 1.0
    with torch.no_grad():
        a, b = model.forward_parallel(tokens, labels), model.forward_parallel(perturbed, labels)
    diff = (a - b).abs().amax(dim=(0, 2))  # (L,)
    assert diff[: j + 1].max().item() < 1e-12  # condition i sees tokens < i only
    assert diff[j + 1] > 1e-3  # the next position reads token j


def count_params(name: str) -> int:
    with torch.device("meta"):
        model = build_model(name)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "name,expected,rel",
    [("Transformer-Medium", 455.4e6, 0.002), ("LatentLM-L", 479e6, 0.01), ("Transformer-Large", 1.02e9, 0.01),
     ("Transformer-XL", 1.82e9, 0.01), ("Transformer-3B", 3.68e9, 0.01)],
)
def test_parameter_counts(name, expected, rel):
    n = count_params(name)
    assert abs(n - expected) / expected < rel, f"{name}: {n / 1e6:.1f}M parameters"


def test_paper_presets_are_imagenet_shaped():
    cfg = get_config("Transformer-Medium")
    assert (cfg.in_channels, cfg.input_size, cfg.patch_size, cfg.num_classes) == (16, 16, 1, 1000)
    assert cfg.seq_len == 256 and cfg.ffn_dim == 4096
    assert get_config("LatentLM-L").ffn_dim == 2730
    assert get_config("DiT-XL").ffn_dim == int(2048 * 4 * 2 / 3 / 64) * 64
    assert {"Transformer-Tiny", "DiT-Tiny", "DiT-Medium", "LatentLM-L"} <= set(list_models())


def test_fresh_diffusion_head_outputs_exactly_zero():
    model = tiny()
    x = torch.randn(5, model.config.token_dim)
    out = model.head(x, torch.rand(5) * 999, torch.randn(5, 64))
    assert torch.equal(out, torch.zeros_like(out))
    dit = tiny("DiT-Tiny")
    latents = torch.randn(2, 4, 4, 4)
    out = dit.denoise(latents, torch.tensor([10.0, 900.0]), torch.tensor([1, 10]))
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("p", [1, 2])
def test_patchify_round_trip_and_raster_order(p):
    x = torch.randn(2, 3, 8, 8)
    tokens = patchify(x, p)
    assert tokens.shape == (2, (8 // p) ** 2, 3 * p * p)
    assert torch.equal(unpatchify(tokens, 3, 8, p), x)
    # Token 1 is the patch right of token 0 (row-major raster order).
    assert torch.equal(tokens[0, 1].reshape(3, p, p), x[0, :, :p, p : 2 * p])


@pytest.mark.parametrize("name", ["Transformer-Tiny", "DiT-Tiny"])
@pytest.mark.parametrize("process", [{"kind": "ddpm"}, {"kind": "flow"}])
def test_loss_trains_every_part(name, process):
    model = tiny(name, num_kv_heads=2, patch_size=2, input_size=8, process=process).train()
    latents, labels = torch.randn(3, 4, 8, 8), torch.tensor([0, 3, 9])
    loss = model(latents, labels)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    final = model.head.final.linear if name.startswith("Transformer") else model.final.linear
    assert final.weight.grad.abs().sum() > 0  # zero-init output layer still gets a gradient


def sampler(**kw) -> SamplerConfig:
    return SamplerConfig(num_steps=kw.pop("num_steps", 4), **kw)


def perturbed(model):
    """A model whose head output is not zero (a fresh head predicts exactly 0 everywhere)."""
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("name", ["Transformer-Tiny", "DiT-Tiny"])
def test_generation_is_deterministic_and_batch_independent(name):
    model = perturbed(tiny(name))
    s = sampler(cfg_scale=2.0)
    a = model.generate(torch.tensor([3, 1, 2]), s, seed=7)
    b = model.generate(torch.tensor([3, 1, 2]), s, seed=7)
    assert torch.equal(a, b)  # bit-identical rerun
    assert a.shape == (3, 4, 4, 4)
    # Sample index 1 again, inside a batch of another size and composition.
    c = model.generate(torch.tensor([5, 1, 7, 0]), s, seed=7, sample_indices=[10, 1, 11, 12])
    assert (c[1] - a[1]).abs().max().item() < 1e-4
    assert (c[0] - a[0]).abs().max().item() > 1e-3  # different index, different noise
    d = model.generate(torch.tensor([3, 1, 2]), s, seed=8)
    assert (d - a).abs().max().item() > 1e-3


def test_guided_path_at_scale_one_equals_unguided():
    model = perturbed(tiny())
    labels = torch.tensor([4, 2])
    plain = model.generate(labels, sampler(cfg_scale=1.0), seed=1)
    # The linear schedule at scale 1 runs the [labels; null] batch with scale 1 at every token.
    guided = model.generate(labels, sampler(cfg_scale=1.0, cfg_schedule="linear"), seed=1)
    assert (plain - guided).abs().max().item() < 1e-5
    strong = model.generate(labels, sampler(cfg_scale=4.0), seed=1)
    assert (plain - strong).abs().max().item() > 1e-3


@pytest.mark.parametrize("name", ["Transformer-Tiny", "DiT-Tiny"])
@pytest.mark.parametrize("kind,sampler_name", [("ddpm", "ddim"), ("ddpm", "ddpm"), ("flow", "heun")])
def test_every_sampler_generates_finite_latents(name, kind, sampler_name):
    model = perturbed(tiny(name, process={"kind": kind}))
    out = model.generate(torch.tensor([1, 2]), sampler(sampler=sampler_name, cfg_scale=1.5, temperature=0.9))
    assert out.shape == (2, 4, 4, 4) and torch.isfinite(out).all()


def test_config_round_trips_through_json():
    model = tiny(num_kv_heads=2, process={"kind": "flow", "timestep_sampling": "logit_normal"})
    restored_cfg = from_dict(ModelConfig, json.loads(json.dumps(to_dict(model.config))))
    assert restored_cfg == model.config
    restored = model_from_config(restored_cfg)
    restored.load_state_dict(model.state_dict())
    tokens = torch.randn(2, 16, 4)
    labels = torch.tensor([1, 2])
    with torch.no_grad():
        assert torch.equal(restored.eval().forward_parallel(tokens, labels), model.forward_parallel(tokens, labels))


def test_bad_inputs_raise_value_errors_naming_the_value():
    model = tiny()
    with pytest.raises(ValueError, match=r"\(N, 4, 4, 4\)"):
        model.loss(torch.randn(2, 3, 4, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="label 11 out of range"):
        model.loss(torch.randn(2, 4, 4, 4), torch.tensor([0, 11]))
    with pytest.raises(ValueError, match="label -1 out of range"):
        model.generate(torch.tensor([-1]))
    with pytest.raises(ValueError, match="unknown model 'Transformer-Huge'.*Transformer-Tiny"):
        build_model("Transformer-Huge")
    with pytest.raises(ValueError, match="unknown model options"):
        build_model("Transformer-Tiny", hidden=3)
    with pytest.raises(ValueError, match="sampler.*'foo'"):
        model.generate(torch.tensor([1]), SamplerConfig(sampler="foo"))
    with pytest.raises(ValueError, match="num_kv_heads=3"):
        build_model("Transformer-Tiny", num_kv_heads=3)
    with pytest.raises(ValueError, match="input_size=6 is not divisible by patch_size=4"):
        build_model("DiT-Tiny", input_size=6, patch_size=4)


def test_import_and_cpu_forward_never_touch_cuda():
    model = tiny()
    model.loss(torch.randn(1, 4, 4, 4), torch.tensor([1]))
    assert not torch.cuda.is_initialized()


@torch.no_grad()
def generate_full_prefix(model, labels: torch.Tensor, sampler_cfg: SamplerConfig, seed: int) -> torch.Tensor:
    """``LatentLM.generate`` without the KV cache: the backbone re-reads the whole prefix for every token
    (quadratic; the reference the cached generation is checked against)."""
    setup = start_generation(model, labels, sampler_cfg, seed, None)
    cfg, tokens = model.config, []
    for i in range(cfg.seq_len):
        # The prefix plus a placeholder for token i, which forward_parallel never reads.
        prefix = torch.stack([*tokens, torch.zeros(len(setup.stream), cfg.token_dim)], dim=1)  # (B, i+1, C p^2)
        cond = model.forward_parallel(prefix, setup.stream)[:, -1]  # (B, D)
        scale = guidance_scale_at(i, cfg.seq_len, sampler_cfg.cfg_scale, sampler_cfg.cfg_schedule)
        denoise = guided_denoiser(lambda x_t, t, c=cond: model.head(x_t, t, c), scale, setup.guided)
        token = sample(model.process, denoise, setup.randn((cfg.token_dim,)), sampler_cfg, randn=setup.randn)
        tokens.append(torch.cat([token, token]) if setup.guided else token)
    seq = torch.stack(tokens, dim=1)[: len(labels)]  # (N, L, C p^2)
    return unpatchify(seq, cfg.in_channels, cfg.input_size, cfg.patch_size)


def test_cached_generation_equals_full_prefix_recompute():
    model = perturbed(tiny(num_kv_heads=2))
    labels = torch.tensor([4, 2, 10])
    s = sampler(cfg_scale=2.5, cfg_schedule="linear")
    cached = model.generate(labels, s, seed=3)
    naive = generate_full_prefix(model, labels, s, seed=3)
    assert (cached - naive).abs().max().item() < 1e-4


@pytest.mark.parametrize("overrides", [{}, {"num_kv_heads": 2}], ids=["mha", "gqa"])
def test_static_shape_generation_equals_dynamic(overrides):
    """The fixed-shape path (what CUDA graphs replay on a GPU) samples what the dynamic path samples."""
    model = perturbed(tiny(**overrides))
    labels = torch.tensor([4, 2, 10])
    for s in (sampler(cfg_scale=2.5, cfg_schedule="linear"), sampler(cfg_scale=1.0)):
        dynamic = model.generate(labels, s, seed=5, static=False)
        fixed = model.generate(labels, s, seed=5, static=True)
        assert (dynamic - fixed).abs().max().item() < 1e-5
    with pytest.raises(ValueError, match="static=True needs"):
        model.generate(labels, sampler(sampler="ddpm"), static=True)


def reference_flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, causal):
    """flash-attn 2's documented ``flash_attn_with_kvcache`` contract in plain torch, for one new token: write
    k, v (B, 1, Hkv, hd) at row cache_seqlens[b] of the (B, L, Hkv, hd) caches in place, attend q (B, 1, H, hd)
    to rows 0..cache_seqlens[b], kv heads shared by consecutive groups of query heads."""
    assert q.shape[1] == 1 and causal and cache_seqlens.dtype == torch.int32 and k_cache.stride(-1) == 1
    out = []
    for b, n in enumerate(cache_seqlens.tolist()):
        k_cache[b, n], v_cache[b, n] = k[b, 0], v[b, 0]
        group = q.shape[2] // k_cache.shape[2]
        keys = k_cache[b, : n + 1].repeat_interleave(group, dim=1).transpose(0, 1)  # (H, n+1, hd)
        values = v_cache[b, : n + 1].repeat_interleave(group, dim=1).transpose(0, 1)
        out.append(torch.nn.functional.scaled_dot_product_attention(q[b].transpose(0, 1), keys, values))  # (H, 1, hd)
    return torch.stack(out).transpose(1, 2)  # (B, 1, H, hd)


@pytest.mark.parametrize("overrides", [{}, {"num_kv_heads": 2}], ids=["mha", "gqa"])
def test_flash_kvcache_step_equals_sdpa_step(monkeypatch, overrides):
    """The fixed-shape step's flash-attn 2 path (taken on CUDA when it imports) against the SDPA path, with
    flash_attn_with_kvcache replaced by its documented contract: layouts, cache writes and seqlens."""
    import latentlm.models.layers as layers

    model = perturbed(tiny(**overrides))
    labels = torch.tensor([4, 2, 10])
    s = sampler(cfg_scale=2.5, fused="off")
    masked = model.generate(labels, s, seed=5, static=True)
    monkeypatch.setattr(layers, "flash_kvcache_usable", lambda x: True)
    monkeypatch.setattr(layers, "_flash_attn_kvcache", lambda: reference_flash_attn_with_kvcache)
    flash = model.generate(labels, s, seed=5, static=True)
    assert (masked - flash).abs().max().item() < 1e-5 and masked.abs().max() > 0.1


def test_sincos_table_halves():
    # Built independently from the definition: cell (row i, column j) at position i * G + j, frequencies
    # 10000^(-k / (D/4)); MAE's table (columns_first) encodes np.meshgrid(grid_w, grid_h)[0], the column, first.
    grid, dim = 3, 8
    omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim / 4))
    columns, rows = np.meshgrid(np.arange(grid), np.arange(grid))  # MAE's np.meshgrid(grid_w, grid_h)

    def axis(coordinate: np.ndarray) -> np.ndarray:
        angles = coordinate.reshape(-1)[:, None] * omega[None]  # (G*G, D/4)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    mae = np.concatenate([axis(columns), axis(rows)], axis=1)  # (G*G, D)
    np.testing.assert_allclose(sincos_2d(grid, dim, columns_first=True).numpy(), mae, rtol=0, atol=1e-12)
    ours = sincos_2d(grid, dim).numpy()
    np.testing.assert_allclose(ours, np.concatenate([axis(rows), axis(columns)], axis=1), rtol=0, atol=1e-12)
    assert ours[1, 0] == 0.0 and ours[1, dim // 2] != 0.0  # position 1 is (row 0, column 1): row half is sin(0)
