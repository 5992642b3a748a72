"""Layers shared by LatentLM and DiT: norms, SwiGLU, rotary and 2-D sin-cos positions, attention with a
KV cache, timestep/label embedders, adaLN modulation, the zero-initialised final layer, patchify, and
the weight initialisation both models share.

Importing this module never touches CUDA: the flash-attn probe runs lazily, on the first
attention call that could use it.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# ---------------------------------------------------------------------------------------------
# Norms and MLPs
# ---------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """RMSNorm without a learned weight, computed in float32 (or float64) for stability under bf16."""

    def __init__(self, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x), no biases. w1 and w3 are fused into one matmul."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w13 = nn.Linear(dim, 2 * hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)  # (..., hidden) each
        return self.w2(F.silu(gate) * up)


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, *args: Any, checkpointing: bool = False) -> torch.Tensor:
    """``x = block(x, *args)`` for every block. With ``checkpointing`` (and autograd recording) each block runs
    under non-reentrant activation checkpointing: it keeps only its input and recomputes the rest in backward.
    The block is called as a module, so hooks on it (FSDP's gather of a sharded block) run on every call."""
    for block in blocks:
        if checkpointing and torch.is_grad_enabled():
            x = checkpoint(block, x, *args, use_reentrant=False)
        else:
            x = block(x, *args)
    return x


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x * (1 + scale) + shift; shift/scale broadcast over the token axis when x is (N, T, D)."""
    if x.dim() == 3:
        shift, scale = shift.unsqueeze(1), scale.unsqueeze(1)
    return x * (1 + scale) + shift


# ---------------------------------------------------------------------------------------------
# Embedders
# ---------------------------------------------------------------------------------------------


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> D vectors: 256-d sinusoid -> Linear -> SiLU -> Linear (no biases)."""

    def __init__(self, dim: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim, bias=False), nn.SiLU(), nn.Linear(dim, dim, bias=False))

    @staticmethod
    def sinusoid(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """(N,) float timesteps (model units, e.g. 0..999) -> (N, dim) [cos | sin] features.

        Computed in at least float32: timesteps up to 1000 are not representable in bf16.
        """
        dtype = torch.promote_types(t.dtype, torch.float32)
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=dtype, device=t.device) / half)
        args = t.to(dtype)[:, None] * freqs[None]  # (N, half)
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = self.sinusoid(t, self.freq_dim)  # (N, 256)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))  # (N, D)


class LabelEmbedder(nn.Module):
    """Class labels -> D vectors. Row ``num_classes`` is the null class used for classifier-free guidance."""

    def __init__(self, num_classes: int, dim: int, dropout_prob: float) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.table = nn.Embedding(num_classes + 1, dim)

    def drop(self, labels: torch.Tensor) -> torch.Tensor:
        """Replace each label by the null class with probability ``dropout_prob`` (global RNG)."""
        if self.dropout_prob <= 0:
            return labels
        mask = torch.rand(labels.shape, device=labels.device) < self.dropout_prob
        return torch.where(mask, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.table(labels)  # (N, D)


# ---------------------------------------------------------------------------------------------
# Positions
# ---------------------------------------------------------------------------------------------


def rope_tables(length: int, head_dim: int, theta: float = 10000.0, frequencies: str = "geometric"
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (length, head_dim) in float64 for rotate-half rotary embedding, positions 0..length-1.

    ``frequencies``: "geometric" is the standard theta^(-2i/hd), i < hd/2; "linspace" is the reference
    LatentLM code's 1 / theta^(i / (hd/2 - 1)), exponents evenly spaced from 0 to 1 (so the last
    frequency is exactly 1/theta).
    """
    if frequencies == "linspace":
        inv_freq = 1.0 / theta ** torch.linspace(0, 1, head_dim // 2, dtype=torch.float64)  # (hd/2,)
    else:
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (hd/2,)
    angles = torch.arange(length, dtype=torch.float64)[:, None] * inv_freq[None]  # (L, hd/2)
    angles = torch.cat([angles, angles], dim=-1)  # (L, hd)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, hd) by position tables cos/sin of shape (T, hd); math in >= float32."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(dtype)
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (xf * cos.to(dtype) + rotated * sin.to(dtype)).to(x.dtype)


def sincos_2d(grid: int, dim: int, columns_first: bool = False) -> torch.Tensor:
    """Fixed 2-D sin-cos position table (grid*grid, dim), float64; row p = i·grid + j is grid cell (row i, column j).

    Each half encodes one coordinate c as [sin(c·ω_0..ω_{K-1}), cos(c·ω_0..ω_{K-1})], K = dim/4,
    ω_k = 10000^(-k/K). ``columns_first=False`` (ours): dims [0, dim/2) encode the row i, [dim/2, dim) the
    column j. ``columns_first=True``: the column j first, then the row i, which is MAE's
    ``get_2d_sincos_pos_embed`` as DiT and the reference LatentLM code use it (its first half, named
    ``emb_h``, is computed from ``np.meshgrid(grid_w, grid_h)[0]``: the column coordinate).
    """
    if dim % 4:
        raise ValueError(f"hidden_size={dim} must be divisible by 4 for the 2-D sin-cos embedding")
    coords = torch.arange(grid, dtype=torch.float64)
    gy, gx = torch.meshgrid(coords, coords, indexing="ij")  # (grid, grid) each
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # (D/4,)

    def one_axis(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1)[:, None] * omega[None]  # (G*G, D/4)
        return torch.cat([out.sin(), out.cos()], dim=1)  # (G*G, D/2)

    halves = (one_axis(gx), one_axis(gy)) if columns_first else (one_axis(gy), one_axis(gx))
    return torch.cat(halves, dim=1)  # (G*G, D)


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------


@dataclass
class KVCache:
    """Pre-allocated keys/values of one attention layer: (B, H_kv, L_max, hd) each."""

    k: torch.Tensor
    v: torch.Tensor

    @classmethod
    def empty(cls, batch: int, kv_heads: int, length: int, head_dim: int, device, dtype) -> KVCache:
        shape = (batch, kv_heads, length, head_dim)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))


@functools.lru_cache(maxsize=1)
def _flash_attn_func():
    """flash_attn_func if flash-attn 2 imports, else None (probed once, lazily)."""
    try:
        from flash_attn import flash_attn_func
    except Exception:  # not installed, or built for another CUDA/torch
        return None
    return flash_attn_func


@functools.lru_cache(maxsize=1)
def _flash_attn_kvcache():
    """flash_attn_with_kvcache if flash-attn 2 imports, else None (probed once, lazily)."""
    try:
        from flash_attn import flash_attn_with_kvcache
    except Exception:
        return None
    return flash_attn_with_kvcache


def _flash_capable(x: torch.Tensor) -> bool:
    """A CUDA tensor of compute capability >= 8 in fp16/bf16: what flash-attn 2 runs on."""
    if x.device.type != "cuda" or x.dtype not in (torch.float16, torch.bfloat16):
        return False
    return torch.cuda.get_device_capability(x.device)[0] >= 8


def _use_flash(q: torch.Tensor) -> bool:
    return _flash_capable(q) and _flash_attn_func() is not None


def flash_kvcache_usable(x: torch.Tensor) -> bool:
    """Whether the fixed-shape cached step of tensors like ``x`` runs flash-attn 2's ``flash_attn_with_kvcache``."""
    return _flash_capable(x) and _flash_attn_kvcache() is not None


def cached_step_backend(x: torch.Tensor) -> str:
    """What the fixed-shape cached step's attention calls for tensors like ``x``: "flash_attn_with_kvcache" or
    "sdpa" (whose kernel SDPA picks itself; ``benchmarks/gpu_generation.py`` records which one ran)."""
    return "flash_attn_with_kvcache" if flash_kvcache_usable(x) else "sdpa"


class Attention(nn.Module):
    """Multi-head attention with optional grouped-query heads, rotary positions and a KV cache.

    Fused qkv and output projections without bias. SDPA always works; flash-attn 2 is used for
    the full-sequence path on CUDA (capability >= 8) in fp16/bf16 when it imports.
    """

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, causal: bool) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = dim // num_heads
        self.causal = causal
        self.qkv = nn.Linear(dim, (num_heads + 2 * num_kv_heads) * self.head_dim, bias=False)
        self.proj = nn.Linear(num_heads * self.head_dim, dim, bias=False)

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, _ = x.shape
        hd, H, Hkv = self.head_dim, self.num_heads, self.num_kv_heads
        q, k, v = self.qkv(x).split([H * hd, Hkv * hd, Hkv * hd], dim=-1)
        q = q.view(B, T, H, hd).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(B, T, Hkv, hd).transpose(1, 2)  # (B, Hkv, T, hd)
        v = v.view(B, T, Hkv, hd).transpose(1, 2)  # (B, Hkv, T, hd)
        return q, k, v

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Full sequence: x (B, T, D) -> (B, T, D); rope tables (T, hd) or None."""
        B, T, D = x.shape
        q, k, v = self._split(x)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if _use_flash(q):
            flash = _flash_attn_func()
            out = flash(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=self.causal)  # (B,T,H,hd)
            out = out.reshape(B, T, -1)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, is_causal=self.causal, enable_gqa=self.num_kv_heads != self.num_heads
            )  # (B, H, T, hd)
            out = out.transpose(1, 2).reshape(B, T, -1)
        return self.proj(out)

    def step(
        self,
        x: torch.Tensor,
        cache: KVCache,
        pos: int | torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        """One new token at position ``pos``: x (B, 1, D) -> (B, 1, D); writes its k, v into ``cache``.

        The query attends to cached positions 0..pos, which is exactly the causal row ``pos``.
        ``pos`` as an int slices the cache; as a (1,) int64 tensor every shape is fixed, so the step can
        be replayed as a CUDA graph: with flash-attn 2 (CUDA, fp16/bf16) ``flash_attn_with_kvcache``
        appends to the cache and reads slots 0..pos only; otherwise SDPA attends the whole cache with a mask.
        """
        B, H, Hkv, hd = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = self._split(x)  # q (B, H, 1, hd), k/v (B, Hkv, 1, hd)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if isinstance(pos, int):
            cache.k[:, :, pos : pos + 1] = k
            cache.v[:, :, pos : pos + 1] = v
            keys, values = cache.k[:, :, : pos + 1], cache.v[:, :, : pos + 1]  # (B, Hkv, pos+1, hd)
            out = F.scaled_dot_product_attention(q, keys, values, enable_gqa=Hkv != H)  # (B, H, 1, hd)
            return self.proj(out.transpose(1, 2).reshape(B, 1, H * hd))
        if flash_kvcache_usable(q):
            # Writes k, v at slot pos of the cache in place and attends to slots 0..pos only.
            seqlens = pos.to(torch.int32).expand(B).contiguous()  # (B,) tokens already cached
            out = _flash_attn_kvcache()(q.transpose(1, 2), cache.k.transpose(1, 2), cache.v.transpose(1, 2),
                                        k=k.transpose(1, 2), v=v.transpose(1, 2), cache_seqlens=seqlens,
                                        causal=True)  # (B, 1, H, hd); the cache viewed as (B, L_max, Hkv, hd)
            return self.proj(out.reshape(B, 1, H * hd))
        cache.k[:, :, pos] = k.to(cache.k.dtype)  # index_put_: written in place also when compiled
        cache.v[:, :, pos] = v.to(cache.v.dtype)
        mask = torch.arange(cache.k.shape[2], device=pos.device)[None, None, None, :] <= pos  # (1, 1, 1, L_max)
        # One query per stream: the H / Hkv query heads of a group become query rows of their shared kv head,
        # a plain (non-GQA) masked call that SDPA's fused kernels accept (enable_gqa + a mask leaves only the
        # math kernel on CUDA), with no repeated keys. Slots after pos are masked out.
        q = q.reshape(B, Hkv, H // Hkv, hd)  # (B, Hkv, G, hd); head h = g G + j
        out = F.scaled_dot_product_attention(q, cache.k, cache.v, attn_mask=mask)  # (B, Hkv, G, hd)
        return self.proj(out.reshape(B, 1, H * hd))


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


class FinalLayer(nn.Module):
    """RMSNorm -> adaLN (shift, scale) -> Linear(D, out). Modulation and output are zero-initialised."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm()
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim, bias=False))
        self.linear = nn.Linear(dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.modulated(x, *self.adaLN(c).chunk(2, dim=-1))  # shift, scale (N, D) each

    def modulated(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The layer with its modulation vectors given (the head's fused solve computes them in advance)."""
        return self.linear(modulate(self.norm(x), shift, scale))


def patchify(latents: torch.Tensor, p: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, L, C p^2) tokens in raster order, L = (H/p)(W/p); a token is (C, p, p) flattened."""
    N, C, H, W = latents.shape
    x = latents.reshape(N, C, H // p, p, W // p, p)
    x = x.permute(0, 2, 4, 1, 3, 5)  # (N, H/p, W/p, C, p, p)
    return x.reshape(N, (H // p) * (W // p), C * p * p)


def unpatchify(tokens: torch.Tensor, channels: int, side: int, p: int) -> torch.Tensor:
    """Inverse of ``patchify``: (N, L, C p^2) -> (N, C, side, side)."""
    N = tokens.shape[0]
    g = side // p
    x = tokens.reshape(N, g, g, channels, p, p)
    x = x.permute(0, 3, 1, 4, 2, 5)  # (N, C, H/p, p, W/p, p)
    return x.reshape(N, channels, side, side)


# ---------------------------------------------------------------------------------------------
# Initialisation
# ---------------------------------------------------------------------------------------------


def initialize_adaln_zero(model: nn.Module, label_table: nn.Embedding, time_mlp: nn.Sequential,
                          zeroed: list[nn.Linear]) -> None:
    """The initialisation LatentLM and DiT share (DiT's recipe).

    Linear weights keep PyTorch's default init and every bias starts at zero; the label table and the
    timestep MLP are N(0, 0.02); the ``zeroed`` layers (adaLN modulations and the output projection) start
    at zero, so every adaLN-Zero block starts as the identity and the model's output is exactly zero.
    """
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    nn.init.normal_(label_table.weight, std=0.02)
    for layer in time_mlp:
        if isinstance(layer, nn.Linear):
            nn.init.normal_(layer.weight, std=0.02)
    for layer in zeroed:
        nn.init.zeros_(layer.weight)
