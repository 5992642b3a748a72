"""DiT baseline: a non-causal diffusion Transformer over the whole latent grid.

Same tokens, loss and generation contract as LatentLM, so one trainer and one sampler serve both.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from latentlm.config import ModelConfig, SamplerConfig
from latentlm.diffusion import build_process, cfg_combine, check_sampler, sample
from latentlm.models.layers import (
    Attention,
    FinalLayer,
    LabelEmbedder,
    RMSNorm,
    SwiGLU,
    TimestepEmbedder,
    check_labels,
    check_latents,
    patchify,
    sample_noise_for,
    sincos_2d,
    unpatchify,
)


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


class DiT(nn.Module):
    """Class-conditional DiT with RMSNorm and SwiGLU. ``model(latents, labels)`` returns the loss."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        if cfg.family != "dit":
            raise ValueError(f"DiT needs family='dit', got {cfg.family!r}")
        self.config = cfg
        D = cfg.hidden_size
        self.x_embed = nn.Linear(cfg.token_dim, D)  # patch embedder (with bias), same as a p x p conv
        self.t_embed = TimestepEmbedder(D)
        self.y_embed = LabelEmbedder(cfg.num_classes, D, cfg.class_dropout_prob)
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.depth))
        self.final = FinalLayer(D, cfg.token_dim)
        with torch.device("cpu"):  # schedules are float64 CPU data, even when the model is built on meta
            self.process = build_process(cfg.process)
        self._pos: dict[torch.device, torch.Tensor] = {}
        self.initialize_weights()

    def initialize_weights(self) -> None:
        # Linear weights keep PyTorch's default init; every bias starts at zero.
        for module in self.modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        # Label table and timestep MLP: N(0, 0.02).
        nn.init.normal_(self.y_embed.table.weight, std=0.02)
        for layer in self.t_embed.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=0.02)
        # adaLN-Zero: every block starts as the identity and the output is exactly zero.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN[-1].weight)
        nn.init.zeros_(self.final.adaLN[-1].weight)
        nn.init.zeros_(self.final.linear.weight)

    def _pos_embed(self, device: torch.device) -> torch.Tensor:
        """Fixed 2-D sin-cos table (L, D) in float64, per device (never a buffer, so never rounded)."""
        if device not in self._pos:
            grid = self.config.input_size // self.config.patch_size
            self._pos[device] = sincos_2d(self.config.hidden_size, grid).to(device)
        return self._pos[device]

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """x_t (N, C, H, W), t (N,) in model time units, labels (N,) -> output (N, C, H, W) on all channels."""
        cfg = self.config
        x = self.x_embed(patchify(x_t, cfg.patch_size).to(self.x_embed.weight.dtype))  # (N, L, D), L = (H/p)^2
        x = x + self._pos_embed(x.device).to(x.dtype)
        c = self.t_embed(t) + self.y_embed(labels)  # (N, D)
        for block in self.blocks:
            x = block(x, c)
        out = self.final(x, c).to(x_t.dtype)  # (N, L, C p^2), in the solver's dtype
        return unpatchify(out, cfg.in_channels, cfg.input_size, cfg.patch_size)

    def loss(self, latents: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean diffusion loss with one timestep per image. latents (N, C, H, W) normalized."""
        check_latents(latents, self.config)
        check_labels(labels, self.config.num_classes)
        if self.training:
            labels = self.y_embed.drop(labels)  # label dropout trains the null class for CFG
        return self.process.loss(lambda x_t, t: self.denoise(x_t, t, labels), latents).mean()

    def forward(self, latents: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The training loss (so DDP/FSDP wrappers see a forward call)."""
        return self.loss(latents, labels)

    @torch.no_grad()
    def generate(
        self,
        labels: torch.Tensor,
        sampler: SamplerConfig | None = None,
        seed: int = 0,
        sample_indices: Sequence[int] | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Sample normalized latents (N, C, H, W); noise of sample k is seeded by (seed, index k)."""
        sampler = sampler or SamplerConfig()
        cfg = self.config
        check_labels(labels, cfg.num_classes)
        check_sampler(self.process, sampler)
        if sampler.cfg_schedule != "constant":
            raise ValueError(f"cfg_schedule={sampler.cfg_schedule!r} follows LatentLM's token order; "
                             "DiT allows only 'constant'")
        device = labels.device
        work = torch.promote_types(next(self.parameters()).dtype, torch.float32)  # solver state >= fp32
        noise = sample_noise_for(labels, seed, sample_indices)
        guided = sampler.cfg_scale != 1.0
        both = torch.cat([labels, torch.full_like(labels, cfg.num_classes)])  # [labels; null labels]

        def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if not guided:
                return self.denoise(x_t, t, labels)
            out = self.denoise(torch.cat([x_t, x_t]), torch.cat([t, t]), both)  # (2N, C, H, W)
            return cfg_combine(*out.chunk(2), sampler.cfg_scale)  # guidance on every channel

        def randn(shape: tuple[int, ...]) -> torch.Tensor:
            return sampler.temperature * noise.randn(shape, device=device, dtype=work)

        shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
        return sample(self.process, denoise, randn(shape), sampler, randn=randn)
