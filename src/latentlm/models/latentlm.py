"""LatentLM: a causal Transformer over continuous latent tokens with a per-token diffusion head.

Training is teacher-forced: the backbone reads ``[label, tok_0, ..., tok_{L-2}]`` and its output at
position i conditions the head's denoising of token i. Generation runs left to right with a KV
cache; every token is produced by a full solver run of the head from fresh Gaussian noise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from latentlm.config import ModelConfig, SamplerConfig
from latentlm.diffusion import guidance_scale_at, sample
from latentlm.models.base import LatentModel
from latentlm.models.generation import (
    FusedHeadSolve,
    GenerationSetup,
    StaticGraph,
    compiled,
    guided_denoiser,
    start_generation,
)
from latentlm.models.head import DiffusionHead
from latentlm.models.layers import (
    Attention,
    KVCache,
    LabelEmbedder,
    RMSNorm,
    SwiGLU,
    flash_kvcache_usable,
    initialize_adaln_zero,
    patchify,
    rope_tables,
    run_blocks,
    unpatchify,
)
from latentlm.progress import progress_bar


class CausalBlock(nn.Module):
    """Pre-norm block: x + Attn(RMSNorm(x)), then x + SwiGLU(RMSNorm(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm1 = RMSNorm()
        self.attn = Attention(cfg.hidden_size, cfg.num_heads, cfg.kv_heads, causal=True)
        self.norm2 = RMSNorm()
        self.mlp = SwiGLU(cfg.hidden_size, cfg.ffn_dim)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope)
        return x + self.mlp(self.norm2(x))

    def step(
        self, x: torch.Tensor, cache: KVCache, pos: int | torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        x = x + self.attn.step(self.norm1(x), cache, pos, rope)
        return x + self.mlp(self.norm2(x))


class LatentLM(LatentModel):
    """Causal Transformer + diffusion head. ``model(latents, labels)`` returns the training loss."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg, "latentlm")
        D = cfg.hidden_size
        self.token_embed = nn.Linear(cfg.token_dim, D)  # clean-token embedder (with bias)
        self.label_embed = LabelEmbedder(cfg.num_classes, D, cfg.class_dropout_prob)
        self.blocks = nn.ModuleList(CausalBlock(cfg) for _ in range(cfg.depth))
        self.norm = RMSNorm()
        self.cond_proj = nn.Linear(D, D, bias=False)  # condition layer: RMSNorm -> Linear
        self.head = DiffusionHead(cfg.token_dim, D, cfg.head_ffn_dim, cfg.head_depth)
        self._rope: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self.initialize_weights()

    def initialize_weights(self) -> None:
        head = self.head
        zeroed = [block.adaLN[-1] for block in head.blocks] + [head.final.adaLN[-1], head.final.linear]
        initialize_adaln_zero(self, self.label_embed.table, head.time_embed.mlp, zeroed)

    # -- shapes ---------------------------------------------------------------------------------
    def _rope_tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary tables (L, hd) in float64, computed on first use per device (never a buffer, so
        ``model.to(bf16)`` cannot round them)."""
        if device not in self._rope:
            cos, sin = rope_tables(self.config.seq_len, self.config.hidden_size // self.config.num_heads,
                                   self.config.rope_theta, self.config.rope_frequencies)
            self._rope[device] = (cos.to(device), sin.to(device))
        return self._rope[device]

    # -- backbone -------------------------------------------------------------------------------
    def forward_parallel(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Teacher-forced conditions: tokens (N, T, C p^2), labels (N,) -> conditions (N, T, D), T <= L.

        Position 0 reads the label embedding, position i >= 1 reads token i-1, so the condition at
        position i sees the label and tokens 0..i-1 only.
        """
        x = self.token_embed(tokens[:, :-1].to(self.token_embed.weight.dtype))  # (N, T-1, D)
        x = torch.cat([self.label_embed(labels)[:, None], x], dim=1)  # (N, L, D)
        cos, sin = self._rope_tables(x.device)
        rope = (cos[: x.shape[1]], sin[: x.shape[1]])  # a prefix of T <= L positions is allowed
        x = run_blocks(self.blocks, x, rope, checkpointing=self.activation_checkpointing)
        return self.cond_proj(self.norm(x))  # (N, L, D)

    def new_cache(self, batch: int, device: torch.device, dtype: torch.dtype) -> list[KVCache]:
        c = self.config
        return [KVCache.empty(batch, c.kv_heads, c.seq_len, c.hidden_size // c.num_heads, device, dtype)
                for _ in range(c.depth)]

    def forward_recurrent(self, inputs: torch.Tensor, pos: int | torch.Tensor, caches: list[KVCache]) -> torch.Tensor:
        """One KV-cached backbone step. pos 0: ``inputs`` are labels (B,); pos i >= 1: the token
        generated at i-1, (B, C p^2). Returns the condition for token ``pos``: (B, D).

        ``pos`` may be a (1,) int64 tensor (i >= 1 only): then every shape is fixed and the step can
        be captured once as a CUDA graph and replayed for every position.
        """
        if isinstance(pos, int) and pos == 0:
            x = self.label_embed(inputs)  # (B, D)
        else:
            x = self.token_embed(inputs.to(self.token_embed.weight.dtype))  # (B, D)
        x = x[:, None]  # (B, 1, D)
        cos, sin = self._rope_tables(x.device)
        if isinstance(pos, int):
            rope = (cos[pos : pos + 1], sin[pos : pos + 1])  # (1, hd) each
        else:
            rope = (cos.index_select(0, pos), sin.index_select(0, pos))
        for block, cache in zip(self.blocks, caches, strict=True):
            x = block.step(x, cache, pos, rope)
        return self.cond_proj(self.norm(x))[:, 0]  # (B, D)

    # -- training -------------------------------------------------------------------------------
    def loss(self, latents: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean diffusion loss over every (token, batch_mul copy). latents (N, C, H, W) normalized.

        The backbone runs once; each condition is repeated ``batch_mul`` times with its own timestep
        and noise, which amortises the backbone over several cheap head evaluations.
        """
        labels = self.training_labels(latents, labels)
        tokens = patchify(latents, self.config.patch_size)  # (N, L, C p^2)
        cond = self.forward_parallel(tokens, labels)  # (N, L, D)
        m = self.config.batch_mul
        x0 = tokens.reshape(-1, tokens.shape[-1]).repeat(m, 1)  # (m N L, C p^2)
        c = cond.reshape(-1, cond.shape[-1]).repeat(m, 1)  # (m N L, D)
        return self.process.loss(lambda x_t, t: self.head(x_t, t, c), x0).mean()

    # -- generation -----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, labels: torch.Tensor, sampler: SamplerConfig | None = None, seed: int = 0,
                 sample_indices: Sequence[int] | None = None, progress: bool = False,
                 static: bool | None = None) -> torch.Tensor:
        """Sample normalized latents (N, C, H, W) for class ``labels`` (N,), left to right with the KV cache.

        The noise of sample k comes from a generator seeded by (seed, sample_indices[k]) (default
        indices 0..N-1), so a sample does not depend on the batch it is generated in.

        ``sampler.fused`` (the switch; "auto": on for CUDA with a deterministic sampler) runs each token's
        solve as ``FusedHeadSolve`` (timestep embeddings per call, all modulations per token in one matmul)
        and it and the backbone step through ``torch.compile``. ``static`` runs every token with fixed
        shapes (masked attention over the whole cache) so that, on CUDA, the backbone step and the head's
        solver run are each captured once as CUDA graphs and replayed per token. Default: on when fused,
        or on CUDA with a deterministic sampler; off otherwise. ``fused="off", static=False`` is the
        reference path.
        """
        setup = start_generation(self, labels, sampler, seed, sample_indices)
        sampler, cfg = setup.sampler, self.config
        N, L, device = labels.shape[0], cfg.seq_len, labels.device
        fused = sampler.fused_on(device.type)
        if static is None:
            static = fused or (device.type == "cuda" and sampler.sampler != "ddpm")
        if static and sampler.sampler == "ddpm":
            raise ValueError("static=True needs a deterministic sampler (not 'ddpm', which draws noise inside the "
                             "solver loop)")
        if fused and not static:
            raise ValueError("static=False cannot be fused: the compiled steps have fixed shapes (set "
                             "sampler.fused='off' for the dynamic-shape reference path)")
        caches = self.new_cache(setup.stream.shape[0], device, next(self.parameters()).dtype)
        cond = self.forward_recurrent(setup.stream, 0, caches)  # (B, D)
        step, solve_token = self._token_runners(setup, caches, cond, static, fused)
        tokens = []
        for i in progress_bar(range(L), desc="tokens", disable=not progress, leave=False):
            scale = guidance_scale_at(i, L, sampler.cfg_scale, sampler.cfg_schedule)
            token = solve_token(setup.randn((cfg.token_dim,)), cond, scale)  # (N, C p^2)
            tokens.append(torch.cat([token, token]) if setup.guided else token)  # (B, C p^2): both halves
            if i + 1 < L:
                cond = step(tokens[-1], i + 1)
        seq = torch.stack(tokens, dim=1)[:N]  # (N, L, C p^2)
        return unpatchify(seq, cfg.in_channels, cfg.input_size, cfg.patch_size)  # (N, C, H, W)

    def _token_runners(self, setup: GenerationSetup, caches: list[KVCache], cond: torch.Tensor, static: bool,
                       fused: bool) -> tuple[Callable, Callable]:
        """``(step(token, pos) -> cond, solve(x_T, cond, scale) -> token)`` for one generate call."""
        sampler, N, device = setup.sampler, setup.labels.shape[0], setup.labels.device

        def step(token: torch.Tensor, pos: int | torch.Tensor) -> torch.Tensor:
            return self.forward_recurrent(token, pos, caches)  # (B, D)

        def solve(x_T: torch.Tensor, cond: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
            """The reference solver run of the head: x_T (N, C p^2), cond (B, D) -> token (N, C p^2)."""
            denoise = guided_denoiser(lambda x_t, t: self.head(x_t, t, cond), scale, setup.guided)
            return sample(self.process, denoise, x_T, sampler, randn=setup.randn)

        if fused:
            step, solve = compiled(step, fullgraph=not flash_kvcache_usable(cond)), compiled(
                FusedHeadSolve(self.head, self.process, setup).__call__)
        if not static:
            return step, solve
        # The same functions on fixed buffers: position as a (1,) tensor, scale as a 0-d tensor.
        capture = device.type == "cuda"
        token0 = torch.zeros(setup.stream.shape[0], self.config.token_dim, device=device, dtype=setup.work)
        pos0 = torch.ones(1, dtype=torch.long, device=device)
        scale0 = torch.ones((), device=device, dtype=setup.work)
        return (StaticGraph(step, token0, pos0, capture=capture and self.config.seq_len > 1),
                StaticGraph(solve, token0[:N], cond, scale0, capture=capture))
