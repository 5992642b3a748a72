"""The per-token diffusion head: an adaLN-Zero MLP over (N, C p^2) noisy tokens.

Tokens never mix here: row i of the output depends only on row i of x_t, t and the condition.
"""

from __future__ import annotations

import torch
from torch import nn

from latentlm.models.layers import FinalLayer, RMSNorm, SwiGLU, TimestepEmbedder, modulate


class HeadBlock(nn.Module):
    """RMSNorm -> modulate(shift, scale) -> SwiGLU -> gated residual, all driven by the condition c."""

    def __init__(self, dim: int, ffn_dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm()
        self.mlp = SwiGLU(dim, ffn_dim)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(dim, 3 * dim, bias=False))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN(c).chunk(3, dim=-1)  # (N, D) each
        return x + gate * self.mlp(modulate(self.norm(x), shift, scale))


class DiffusionHead(nn.Module):
    """Predicts the diffusion/flow target of one token from its noisy value, timestep and condition."""

    def __init__(self, token_dim: int, dim: int, ffn_dim: int, depth: int) -> None:
        super().__init__()
        self.input_proj = nn.Linear(token_dim, dim)  # noisy-token embedder (own weights, with bias)
        self.time_embed = TimestepEmbedder(dim)
        self.blocks = nn.ModuleList(HeadBlock(dim, ffn_dim) for _ in range(depth))
        self.final = FinalLayer(dim, token_dim)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x_t (N, C p^2), t (N,) in model time units, cond (N, D) -> output (N, C p^2)."""
        c = cond + self.time_embed(t)  # (N, D)
        x = self.input_proj(x_t.to(self.input_proj.weight.dtype))  # (N, D); solver state may be wider
        for block in self.blocks:
            x = block(x, c)
        return self.final(x, c).to(x_t.dtype)  # (N, C p^2), in the solver's dtype
