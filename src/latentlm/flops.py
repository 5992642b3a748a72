"""Analytic FLOP counts of LatentLM and DiT: one training step, one generated image, and GPU peaks for MFU.

The counts follow ``torch.utils.flop_counter.FlopCounterMode`` (torch 2.5 - 2.14) rule for rule, so an
analytic number and a measured one can be compared exactly:

* **Matmuls** (``aten.mm`` / ``addmm`` / ``bmm``): ``2 * m * k * n``; every ``nn.Linear`` is one, biases
  are free. Backward is one ``mm`` for the weight gradient and one for the input gradient, so ``2x``
  forward, except where the input needs no gradient (token/patch embedders read data, the first
  timestep-MLP layer reads a fixed sinusoid): there backward is ``1x`` forward.
* **Attention**: torch registers formulas for the CUDA SDPA kernels (``_scaled_dot_product_flash_attention``,
  ``_efficient_attention``, ``_cudnn_attention``): forward ``QK^T + AV`` = ``4 * B * H_q * S_q * S_k * hd``,
  backward 5 matmuls (scores recomputed, then dV, dP, dQ, dK) = ``10 * B * H_q * S_q * S_k * hd``, i.e.
  2.5x forward. A causal mask is **not** discounted (the full ``S_q x S_k`` square is counted) and GQA
  is counted with the query heads ``H_q``. This module uses the same formula.
* **What FlopCounterMode misses**: on CPU, SDPA dispatches to ``aten._scaled_dot_product_flash_attention_for_cpu``
  (also for GQA, causal and masked calls), which has no formula and does not decompose, so on CPU the
  counter reports **0 attention FLOPs**, forward and backward; likewise the flash-attn 2 package's
  custom op on GPU. There ``FlopCounterMode`` equals ``FlopBreakdown.matmul`` only; registering torch's
  SDPA formulas for the CPU ops (see ``tests/test_flops.py``) makes it equal ``FlopBreakdown.total``.
* Forcing the math backend (``sdpa_kernel(SDPBackend.MATH)``) decomposes SDPA into counted ``bmm``s:
  the same forward, but a 2x (4-matmul) backward instead of the kernels' 2.5x.
* Checked on a GPU too: the H200 training-step counts in BENCHMARKS.md (Transformer-Base and DiT-Base,
  batch 64, CUDA SDPA) equal ``training_flops`` exactly.
* Not counted at all (by either): embedding lookups (the label table), norms, rotary, SiLU, adaLN
  modulation, residual adds, the loss, the optimizer and EMA.

Pure arithmetic on a ``ModelConfig``: importing and calling this module needs no torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from latentlm.config import ModelConfig, SamplerConfig

FREQ_DIM = 256  # width of TimestepEmbedder's sinusoid (layers.TimestepEmbedder freq_dim)

Kind = Literal["matmul", "attention"]


@dataclass(frozen=True)
class FlopTerm:
    """One group of identical operations: FLOPs of its forward and of its backward (0 at inference)."""

    component: str  # "embed" | "backbone" | "condition" | "head" (LatentLM) | "final" (DiT)
    kind: Kind
    forward: int
    backward: int

    @property
    def total(self) -> int:
        return self.forward + self.backward


@dataclass(frozen=True)
class FlopBreakdown:
    """FLOPs of a piece of work split by phase (forward/backward), kind (matmul/attention) and component.

    ``total`` is what ``FlopCounterMode`` reports where it counts attention (CUDA SDPA); ``matmul`` is
    what it reports on CPU (see the module docstring).
    """

    terms: tuple[FlopTerm, ...]

    @property
    def forward(self) -> int:
        return sum(t.forward for t in self.terms)

    @property
    def backward(self) -> int:
        return sum(t.backward for t in self.terms)

    @property
    def total(self) -> int:
        return self.forward + self.backward

    @property
    def matmul(self) -> int:
        """Forward + backward FLOPs of the matmuls (every Linear)."""
        return sum(t.total for t in self.terms if t.kind == "matmul")

    @property
    def attention(self) -> int:
        """Forward + backward FLOPs of QK^T and AV (full square, also for causal attention)."""
        return sum(t.total for t in self.terms if t.kind == "attention")

    def components(self) -> dict[str, int]:
        """Forward + backward FLOPs per component, in first-appearance order."""
        out: dict[str, int] = {}
        for t in self.terms:
            out[t.component] = out.get(t.component, 0) + t.total
        return out

    def summary(self) -> str:
        """One line for logs: total, phases, kinds and components in GFLOP."""
        parts = ", ".join(f"{name} {flops / 1e9:.3g}" for name, flops in self.components().items())
        return (f"{self.total / 1e9:.4g} GFLOP (forward {self.forward / 1e9:.4g}, backward {self.backward / 1e9:.4g}; "
                f"matmul {self.matmul / 1e9:.4g}, attention {self.attention / 1e9:.4g}; {parts})")


# ---------------------------------------------------------------------------------------------
# Building blocks: one Linear, one attention call (both counted as FlopCounterMode counts them)
# ---------------------------------------------------------------------------------------------


def _linear(component: str, rows: int, fan_in: int, fan_out: int, train: bool, input_grad: bool = True) -> FlopTerm:
    """``rows`` vectors through Linear(fan_in, fan_out): 2·rows·in·out forward; backward computes the
    weight gradient always and the input gradient only when the input requires one."""
    forward = 2 * rows * fan_in * fan_out
    backward = forward * (2 if input_grad else 1) if train else 0
    return FlopTerm(component, "matmul", forward, backward)


def _attention(component: str, batch_heads: int, pairs: int, head_dim: int, train: bool) -> FlopTerm:
    """``batch_heads`` = B·H_q query streams, ``pairs`` = S_q·S_k (query, key) pairs each (summed over
    calls): forward 2 matmuls, backward 5 (torch's SDPA formulas)."""
    forward = 4 * batch_heads * pairs * head_dim
    return FlopTerm(component, "attention", forward, 10 * batch_heads * pairs * head_dim if train else 0)


def _scaled(term: FlopTerm, factor: int) -> FlopTerm:
    return FlopTerm(term.component, term.kind, term.forward * factor, term.backward * factor)


def _block_matmuls(cfg: ModelConfig, rows: int, train: bool) -> list[FlopTerm]:
    """The four Linears of one backbone block (qkv, proj, SwiGLU w13 and w2) over ``rows`` tokens."""
    D, F, hd = cfg.hidden_size, cfg.ffn_dim, cfg.hidden_size // cfg.num_heads
    return [
        _linear("backbone", rows, D, (cfg.num_heads + 2 * cfg.kv_heads) * hd, train),  # fused qkv
        _linear("backbone", rows, cfg.num_heads * hd, D, train),  # output projection
        _linear("backbone", rows, D, 2 * F, train),  # SwiGLU w1|w3
        _linear("backbone", rows, F, D, train),  # SwiGLU w2
    ]


def _timestep_mlp(component: str, cfg: ModelConfig, rows: int, train: bool) -> list[FlopTerm]:
    """TimestepEmbedder over ``rows`` timesteps: 256 -> D (input is a fixed sinusoid) -> D."""
    D = cfg.hidden_size
    return [_linear(component, rows, FREQ_DIM, D, train, input_grad=False), _linear(component, rows, D, D, train)]


def _head_matmuls(cfg: ModelConfig, rows: int, train: bool) -> list[FlopTerm]:
    """One DiffusionHead evaluation over ``rows`` (noisy token, timestep, condition) triples; its SwiGLU
    hidden size is ``head_ffn_dim`` (the backbone's unless ``head_ffn_hidden_size``)."""
    D, F, C = cfg.hidden_size, cfg.head_ffn_dim, cfg.token_dim
    terms = _timestep_mlp("head", cfg, rows, train)
    terms.append(_linear("head", rows, C, D, train, input_grad=False))  # input_proj reads x_t (data)
    per_block = [
        _linear("head", rows, D, 3 * D, train),  # adaLN: shift, scale, gate
        _linear("head", rows, D, 2 * F, train),
        _linear("head", rows, F, D, train),
    ]
    terms += [_scaled(t, cfg.head_depth) for t in per_block]
    terms.append(_linear("head", rows, D, 2 * D, train))  # final adaLN: shift, scale
    terms.append(_linear("head", rows, D, C, train))  # final linear
    return terms


def _dit_forward(cfg: ModelConfig, images: int, train: bool) -> list[FlopTerm]:
    """``DiT.denoise`` over ``images`` grids (and its backward when ``train``)."""
    D, C, L, hd = cfg.hidden_size, cfg.token_dim, cfg.seq_len, cfg.hidden_size // cfg.num_heads
    T = images * L  # tokens
    terms = [_linear("embed", T, C, D, train, input_grad=False)]  # patch embedder reads x_t (data)
    terms += _timestep_mlp("embed", cfg, images, train)
    per_block = [_linear("backbone", images, D, 6 * D, train)]  # adaLN: 6 modulation vectors per image
    per_block += _block_matmuls(cfg, T, train)
    per_block.append(_attention("backbone", images * cfg.num_heads, L * L, hd, train))  # bidirectional
    terms += [_scaled(t, cfg.depth) for t in per_block]
    terms.append(_linear("final", images, D, 2 * D, train))  # final adaLN
    terms.append(_linear("final", T, D, C, train))
    return terms


# ---------------------------------------------------------------------------------------------
# Public counts
# ---------------------------------------------------------------------------------------------


def training_breakdown(cfg: ModelConfig, batch_size: int) -> FlopBreakdown:
    """FLOPs of one training step (forward + backward of ``model(latents, labels)``) over ``batch_size`` images.

    LatentLM: the backbone over L teacher-forced positions per image (the token embedder sees the L-1
    tokens after the label), the condition layer, and the head over ``batch_mul * L`` rows per image.
    Causal attention is counted as the full L x L square, as FlopCounterMode does. DiT: one denoiser pass
    per image. Gradient accumulation does not change the count: call with the images of one step.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    D, L, hd = cfg.hidden_size, cfg.seq_len, cfg.hidden_size // cfg.num_heads
    if cfg.family == "dit":
        return FlopBreakdown(tuple(_dit_forward(cfg, batch_size, train=True)))
    T = batch_size * L
    terms = [_linear("embed", batch_size * (L - 1), cfg.token_dim, D, True, input_grad=False)]
    per_block = _block_matmuls(cfg, T, True)
    per_block.append(_attention("backbone", batch_size * cfg.num_heads, L * L, hd, True))  # causal, full square
    terms += [_scaled(t, cfg.depth) for t in per_block]
    terms.append(_linear("condition", T, D, D, True))  # cond_proj
    terms += _head_matmuls(cfg, cfg.batch_mul * T, True)
    return FlopBreakdown(tuple(terms))


def training_flops(cfg: ModelConfig, batch_size: int) -> int:
    """FLOPs of one training step over ``batch_size`` images, forward + backward (see ``training_breakdown``)."""
    return training_breakdown(cfg, batch_size).total


def denoiser_calls(sampler: SamplerConfig) -> int:
    """Network evaluations of one solver run: ``num_steps``, except Heun's 2 per step."""
    return 2 * sampler.num_steps if sampler.sampler == "heun" else sampler.num_steps


def generation_breakdown(cfg: ModelConfig, num_steps: int, guided: bool, static: bool = False) -> FlopBreakdown:
    """Forward FLOPs of ``model.generate`` per image (backward is 0).

    ``num_steps`` is the number of denoiser evaluations per token (LatentLM) or per image (DiT): the
    solver's ``num_steps``, doubled for Heun (``denoiser_calls``). ``guided`` doubles every batch (the
    null-class half runs the same network).

    LatentLM (``generate`` with its KV cache): L backbone steps of one token each (step 0
    reads the label embedding, not a matmul; steps 1..L-1 embed the previous token), the condition layer
    per step, and ``num_steps`` head evaluations per token. Step ``pos`` attends to ``pos + 1`` cached
    keys; with ``static=True`` (the fixed-shape path, default on CUDA) steps 1..L-1 attend to all L cache
    slots under a mask, and FlopCounterMode counts those L keys, so that is what is counted then.
    CUDA-graph warm-up calls are not modelled, nor the fused path's saving (``sampler.fused``: the timestep
    MLP runs once per distinct time per call instead of once per evaluation, < 1% of the head's FLOPs).
    DiT: ``num_steps`` full denoiser passes.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps}: must be >= 1")
    g = 2 if guided else 1  # streams per image
    if cfg.family == "dit":
        return FlopBreakdown(tuple(_scaled(t, num_steps) for t in _dit_forward(cfg, g, train=False)))
    D, L, hd = cfg.hidden_size, cfg.seq_len, cfg.hidden_size // cfg.num_heads
    keys = 1 + (L - 1) * L if static else L * (L + 1) // 2  # summed over steps 0..L-1, one query each
    terms = [_linear("embed", g * (L - 1), cfg.token_dim, D, False)]
    per_block = _block_matmuls(cfg, g * L, False)
    per_block.append(_attention("backbone", g * cfg.num_heads, keys, hd, False))
    terms += [_scaled(t, cfg.depth) for t in per_block]
    terms.append(_linear("condition", g * L, D, D, False))
    terms += _head_matmuls(cfg, g * L * num_steps, False)
    return FlopBreakdown(tuple(terms))


def generation_flops(cfg: ModelConfig, num_steps: int, guided: bool, static: bool = False) -> int:
    """Forward FLOPs to generate one image (see ``generation_breakdown``)."""
    return generation_breakdown(cfg, num_steps, guided, static).total


# ---------------------------------------------------------------------------------------------
# Hardware peaks (for MFU)
# ---------------------------------------------------------------------------------------------

# Dense (no 2:4 sparsity) BF16 tensor-core peaks in TFLOP/s, from the vendors' datasheets: NVIDIA H100
# (SXM5 989.4, PCIe 756.5, NVL 835.5), H200 (SXM 989.4, NVL 835.5), A100 (312 for SXM4 and PCIe), L40S
# (362.05), L40 (181.05), L4 (121), A10 (125), B200 (2250, HGX B200), AMD MI300X (1307.4) and MI250X
# (383). The datasheets' headline numbers are "with sparsity"; these are half of them. GeForce cards
# are left out: their BF16 rate with FP32 accumulation (what PyTorch uses) is half their FP16 rate.
# Patterns are tried in order, so variants come before their family.
_PEAKS: tuple[tuple[str, float], ...] = (
    (r"gh200", 989.4),
    (r"h200.*nvl", 835.5),
    (r"h200", 989.4),
    (r"h100.*pcie", 756.5),
    (r"h100.*nvl", 835.5),
    (r"h100", 989.4),  # "H100 80GB HBM3" is the SXM5 part
    (r"h800.*pcie", 756.5),
    (r"h800", 989.4),
    (r"a100|a800", 312.0),
    (r"l40s", 362.05),
    (r"l40\b", 181.05),
    (r"\bl4\b", 121.0),
    (r"\ba10\b", 125.0),
    (r"b200", 2250.0),
    (r"mi300x", 1307.4),
    (r"mi250x", 383.0),
)


def peak_tflops(device_name: str) -> float | None:
    """Dense BF16 peak TFLOP/s of a GPU named like ``torch.cuda.get_device_name()`` (e.g. "NVIDIA H100 80GB
    HBM3" -> 989.4), or None when the card is not known. MFU = achieved FLOP/s / (peak x 1e12)."""
    name = device_name.lower()
    for pattern, tflops in _PEAKS:
        if re.search(pattern, name):
            return tflops
    return None


def mfu(flops: int | float, seconds: float, device_name: str, gpus: int = 1) -> float | None:
    """Model FLOPs utilization: ``flops`` done in ``seconds`` on ``gpus`` cards named ``device_name``, as a
    fraction of their dense BF16 peak; None for an unknown card."""
    peak = peak_tflops(device_name)
    if peak is None or seconds <= 0:
        return None
    return flops / seconds / (peak * 1e12 * gpus)
