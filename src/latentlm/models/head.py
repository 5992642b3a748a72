"""The per-token diffusion head: an adaLN-Zero MLP over (N, C p^2) noisy tokens.

Tokens never mix here: row i of the output depends only on row i of x_t, t and the condition.

Two ways to run it, with the same weights and the same arithmetic per row:

* ``forward(x_t, t, cond)``: the reference (training and eager generation). Every block computes its
  own modulation vectors from c = cond + TimestepEmbedder(t).
* ``modulations`` then ``forward_modulated``: what the fused generation solve uses. The modulations
  depend on (cond, t) only, never on x_t, so a solve whose grid of t is known in advance gets all of
  them for every evaluation in one matmul per token (every adaLN Linear reads the same SiLU(c), so
  their weights stack into one). SiLU blocks any finer split: adaLN(cond + t_emb) is not
  adaLN(cond) + adaLN(t_emb), so the per-(token, t) matmul itself cannot be hoisted further.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from latentlm.models.layers import FinalLayer, RMSNorm, SwiGLU, TimestepEmbedder, modulate, run_blocks


class HeadBlock(nn.Module):
    """RMSNorm -> modulate(shift, scale) -> SwiGLU -> gated residual, all driven by the condition c."""

    def __init__(self, dim: int, ffn_dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm()
        self.mlp = SwiGLU(dim, ffn_dim)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(dim, 3 * dim, bias=False))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.modulated(x, *self.adaLN(c).chunk(3, dim=-1))  # shift, scale, gate (N, D) each

    def modulated(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """The block with its modulation vectors given: x and each vector (N, D) -> (N, D)."""
        return x + gate * self.mlp(modulate(self.norm(x), shift, scale))


class DiffusionHead(nn.Module):
    """Predicts the diffusion/flow target of one token from its noisy value, timestep and condition."""

    def __init__(self, token_dim: int, dim: int, ffn_dim: int, depth: int) -> None:
        super().__init__()
        self.dim = dim
        self.input_proj = nn.Linear(token_dim, dim)  # noisy-token embedder (own weights, with bias)
        self.time_embed = TimestepEmbedder(dim)
        self.blocks = nn.ModuleList(HeadBlock(dim, ffn_dim) for _ in range(depth))
        self.final = FinalLayer(dim, token_dim)
        self.activation_checkpointing = False  # set by LatentModel.set_activation_checkpointing

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x_t (N, C p^2), t (N,) in model time units, cond (N, D) -> output (N, C p^2)."""
        c = cond + self.time_embed(t)  # (N, D)
        x = self.input_proj(x_t.to(self.input_proj.weight.dtype))  # (N, D); solver state may be wider
        x = run_blocks(self.blocks, x, c, checkpointing=self.activation_checkpointing)
        return self.final(x, c).to(x_t.dtype)  # (N, C p^2), in the solver's dtype

    # -- the fused solve's pieces ---------------------------------------------------------------
    def modulation_weight(self) -> torch.Tensor:
        """Every adaLN Linear of the head stacked, blocks then final layer: ((3 depth + 2) D, D)."""
        return torch.cat([block.adaLN[1].weight for block in self.blocks] + [self.final.adaLN[1].weight])

    def modulations(self, c: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """All modulation vectors for conditions c = cond + t_emb (..., D) -> (..., (3 depth + 2) D).

        ``weight`` is ``modulation_weight()``; the same SiLU -> Linear as each ``adaLN``, in one matmul.
        """
        return F.linear(F.silu(c), weight)

    def forward_modulated(self, x_t: torch.Tensor, mods: torch.Tensor) -> torch.Tensor:
        """``forward`` with the modulations of its (t, cond) given: x_t (N, C p^2), mods (N, (3 depth + 2) D)."""
        parts = mods.split(self.dim, dim=-1)  # 3 per block (shift, scale, gate), then the final shift, scale
        x = self.input_proj(x_t.to(self.input_proj.weight.dtype))  # (N, D)
        for i, block in enumerate(self.blocks):
            x = block.modulated(x, *parts[3 * i : 3 * i + 3])
        return self.final.modulated(x, *parts[-2:]).to(x_t.dtype)  # (N, C p^2)
