"""DiT baseline: a non-causal diffusion Transformer over the whole latent grid.

Same tokens, loss and generation contract as LatentLM, so one trainer and one sampler serve both.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from latentlm.config import ModelConfig, SamplerConfig
from latentlm.diffusion import sample
from latentlm.models.base import LatentModel
from latentlm.models.generation import compiled, guided_denoiser, start_generation
from latentlm.models.layers import (
    Attention,
    FinalLayer,
    LabelEmbedder,
    RMSNorm,
    SwiGLU,
    TimestepEmbedder,
    initialize_adaln_zero,
    patchify,
    run_blocks,
    sincos_2d,
    unpatchify,
)

# Names of earlier latentlm versions, mapped on load so their DiT checkpoints keep loading.
_RENAMED = {"x_embed.": "token_embed.", "t_embed.": "time_embed.", "y_embed.": "label_embed."}


class DiTBlock(nn.Module):
    """adaLN-Zero block: six modulation vectors (shift, scale, gate for attention and MLP) from c."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        D = cfg.hidden_size
        self.norm1 = RMSNorm()
        self.attn = Attention(D, cfg.num_heads, cfg.kv_heads, causal=False)
        self.norm2 = RMSNorm()
        self.mlp = SwiGLU(D, cfg.ffn_dim)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D, bias=False))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x (N, L, D), c (N, D) -> (N, L, D)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(c)[:, None].chunk(6, dim=-1)  # (N, 1, D)
        x = x + gate1 * self.attn(self.norm1(x) * (1 + scale1) + shift1)
        return x + gate2 * self.mlp(self.norm2(x) * (1 + scale2) + shift2)


class DiT(LatentModel):
    """Class-conditional DiT with RMSNorm and SwiGLU. ``model(latents, labels)`` returns the loss."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg, "dit")
        D = cfg.hidden_size
        self.token_embed = nn.Linear(cfg.token_dim, D)  # patch embedder (with bias), same as a p x p conv
        self.time_embed = TimestepEmbedder(D)
        self.label_embed = LabelEmbedder(cfg.num_classes, D, cfg.class_dropout_prob)
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.depth))
        self.final = FinalLayer(D, cfg.token_dim)
        self._pos: dict[torch.device, torch.Tensor] = {}
        self.initialize_weights()
        self.register_load_state_dict_pre_hook(_rename_old_keys)

    def initialize_weights(self) -> None:
        zeroed = [block.adaLN[-1] for block in self.blocks] + [self.final.adaLN[-1], self.final.linear]
        initialize_adaln_zero(self, self.label_embed.table, self.time_embed.mlp, zeroed)

    def _pos_embed(self, device: torch.device) -> torch.Tensor:
        """Fixed 2-D sin-cos table (L, D) in float64, per device (never a buffer, so never rounded)."""
        if device not in self._pos:
            grid = self.config.input_size // self.config.patch_size
            table = sincos_2d(grid, self.config.hidden_size, columns_first=self.config.position_table == "mae")
            if self.config.position_table == "mae":
                table = table.float().double()  # MAE and the reference code store it as float32
            self._pos[device] = table.to(device)
        return self._pos[device]

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """x_t (N, C, H, W), t (N,) in model time units, labels (N,) -> output (N, C, H, W) on all channels."""
        cfg = self.config
        x = self.token_embed(patchify(x_t, cfg.patch_size).to(self.token_embed.weight.dtype))  # (N, L, D), L = (H/p)^2
        x = x + self._pos_embed(x.device).to(x.dtype)
        c = self.time_embed(t) + self.label_embed(labels)  # (N, D)
        x = run_blocks(self.blocks, x, c, checkpointing=self.activation_checkpointing)
        out = self.final(x, c).to(x_t.dtype)  # (N, L, C p^2), in the solver's dtype
        return unpatchify(out, cfg.in_channels, cfg.input_size, cfg.patch_size)

    def loss(self, latents: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean diffusion loss with one timestep per image. latents (N, C, H, W) normalized."""
        labels = self.training_labels(latents, labels)
        return self.process.loss(lambda x_t, t: self.denoise(x_t, t, labels), latents).mean()

    @torch.no_grad()
    def generate(self, labels: torch.Tensor, sampler: SamplerConfig | None = None, seed: int = 0,
                 sample_indices: Sequence[int] | None = None, progress: bool = False) -> torch.Tensor:
        """Sample normalized latents (N, C, H, W); noise of sample k is seeded by (seed, index k).

        ``sampler.fused`` ("auto": on for CUDA with a deterministic sampler) runs the denoiser through
        ``torch.compile``; the solver's arithmetic around it stays eager (it is a few ops per step on the
        whole grid, where the network is compute-bound). (``progress`` is accepted for the shared
        contract: a DiT solve has no per-token steps to show.)"""
        setup = start_generation(self, labels, sampler, seed, sample_indices)
        cfg = self.config
        network = compiled(self.denoise) if setup.sampler.fused_on(labels.device.type) else self.denoise
        denoise = guided_denoiser(lambda x_t, t: network(x_t, t, setup.stream), setup.sampler.cfg_scale,
                                  setup.guided)  # guidance on every channel
        x_T = setup.randn((cfg.in_channels, cfg.input_size, cfg.input_size))  # (N, C, H, W)
        return sample(self.process, denoise, x_T, setup.sampler, randn=setup.randn)


def _rename_old_keys(module: nn.Module, state_dict: dict, prefix: str, *args: object) -> None:
    """``load_state_dict`` pre-hook: weights saved under the old embedder names load under the new ones."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix):]
        for old, new in _RENAMED.items():
            if rest.startswith(old):
                state_dict[prefix + new + rest[len(old):]] = state_dict.pop(key)
