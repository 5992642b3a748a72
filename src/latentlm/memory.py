"""Per-GPU memory planner for training LatentLM and DiT under DDP or FSDP, with or without activation
checkpointing, from a ``ModelConfig`` alone (no model is built, no torch is needed).

What is modelled (bytes per GPU, P = parameter count, g = GPUs):

* **State.** fp32 master weights (4 B/param), fp32 gradients (4), AdamW's two fp32 moments (8) and an fp32
  EMA (4): 20 B/param under DDP; under FSDP2 (``fully_shard``, fp32 sharded parameters) each is divided by g.
* **DDP buffers.** DDP's gradient buckets are a second fp32 copy of the gradients (4 B/param) unless
  ``gradient_as_bucket_view=True`` (off by default in PyTorch and in Accelerate, which the trainer uses).
* **Weight copies / gathered units.** DDP with autocast: each Linear weight is cast to bf16 in forward
  and the copy is saved for backward wherever the input needs a gradient (2 B per such weight). FSDP:
  one unit per Transformer block (backbone and head blocks), the rest in the root unit, parameters
  gathered in bf16 (``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``): the root (never
  resharded) plus two blocks in flight (the current one and the prefetched next), plus in backward one
  block's unsharded bf16 gradients and their fp32 copy for the reduce-scatter.
* **Activations** of one process's micro-batch: the tensors autograd saves for backward, enumerated per
  layer (see ``activation_bytes``): SDPA/flash keeps only q, k, v, the output and the logsumexp; norms and
  rotary compute in fp32; LatentLM's head runs on ``batch_mul`` x tokens rows. With activation
  checkpointing (every backbone and head block wrapped in ``checkpoint(use_reentrant=False)``) each
  block keeps only its input, plus one block's full activations while it is recomputed in backward.
* **Workspace**: autograd's gradient buffers in backward, allowed as two gradients of the widest layer
  plus the fp32 residual-stream gradient.
* **Optimizer step**: foreach AdamW allocates a temporary the size of the (local) parameters; it does
  not coexist with activations, so the peak takes the larger of the two phases.
* **Overhead**: a flat allowance for the CUDA context, cuBLAS/NCCL workspaces and allocator slack.

Conservative where it simplifies: gradients are counted beside the full activations (true from the
second micro-step of gradient accumulation on; with one micro-step they grow while activations are freed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from latentlm.config import ModelConfig
from latentlm.flops import FREQ_DIM

GiB = 2**30
Strategy = Literal["ddp", "fsdp"]
Precision = Literal["no", "bf16", "fp16"]

FP32 = 4  # bytes of fp32: master weights, grads, moments, EMA, norm/rotary upcasts, logsumexp
INT64 = 8  # label indices saved by the embedding lookup
FSDP_BLOCKS_IN_FLIGHT = 2  # the block running now and the one prefetched
ADAMW_TEMP_BYTES = 4  # foreach AdamW: one fp32 temporary per parameter during step()


# ---------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of a model, split the way FSDP units and autocast see them."""

    total: int
    block: int  # one backbone block
    head_block: int  # one head block (0 for DiT)
    root: int  # everything outside the blocks: embedders, label table, condition layer, head stem, final layers
    # Weights of the root's Linears whose input needs a gradient (all but the token/patch embedders, the
    # head's input projection and the first timestep-MLP layer, which read data): with the blocks'
    # weights, these are the ones whose autocast bf16 copies are saved for backward.
    root_saved_casts: int


def param_counts(cfg: ModelConfig) -> ParamCounts:
    """Exact parameter counts of ``model_from_config(cfg)`` (tested against ``numel`` for every preset)."""
    D, F, C, hd = cfg.hidden_size, cfg.ffn_dim, cfg.token_dim, cfg.hidden_size // cfg.num_heads
    table = (cfg.num_classes + 1) * D  # label embedding, incl. the null class
    attn = D * (cfg.num_heads + 2 * cfg.kv_heads) * hd + cfg.num_heads * hd * D  # qkv + proj, no biases
    mlp = D * 2 * F + F * D  # SwiGLU w13 + w2
    head_mlp = 3 * D * cfg.head_ffn_dim  # the head's SwiGLU (its own width when head_ffn_hidden_size is set)
    final = D * 2 * D + D * C  # final adaLN + output linear
    data_linears = FREQ_DIM * D + C * D  # first timestep-MLP layer + the embedder of x_t / patches
    if cfg.family == "dit":
        block, head_block = attn + mlp + D * 6 * D, 0  # + adaLN-Zero (6 vectors)
        saved_casts = D * D + final  # second timestep-MLP layer, final layer
        biases = D  # the patch embedder's
        blocks = cfg.depth * block
    else:
        block, head_block = attn + mlp, head_mlp + D * 3 * D  # head block: + adaLN (shift, scale, gate)
        saved_casts = D * D + D * D + final  # cond_proj, second timestep-MLP layer, head final layer
        data_linears += C * D  # LatentLM embeds clean tokens and (in the head) noisy ones
        biases = 2 * D  # token embedder and head input projection
        blocks = cfg.depth * block + cfg.head_depth * head_block
    root = table + data_linears + saved_casts + biases
    return ParamCounts(total=blocks + root, block=block, head_block=head_block, root=root,
                       root_saved_casts=saved_casts)


# ---------------------------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ActivationBytes:
    """Bytes autograd keeps for backward after one micro-batch's forward, by part of the model."""

    stem: int  # outside the blocks: embedders, final norm + condition layer, head stem and final layer, loss
    blocks: int  # all backbone blocks (with checkpointing: their inputs only)
    head_blocks: int  # all head blocks (LatentLM; with checkpointing: their inputs only)
    recompute: int  # checkpointing: one block's full activations while it is recomputed (0 without)

    @property
    def saved(self) -> int:
        """What is saved at the end of forward (what ``saved_tensors_hooks`` sees)."""
        return self.stem + self.blocks + self.head_blocks

    @property
    def total(self) -> int:
        """Peak activation bytes: the saved tensors plus, with checkpointing, one recomputed block."""
        return self.saved + self.recompute


def activation_bytes(
    cfg: ModelConfig,
    micro_batch: int,
    mixed_precision: Precision = "bf16",
    activation_checkpointing: bool = False,
    autocast: bool = True,
    attention_out_copy: bool = False,
) -> ActivationBytes:
    """Bytes of the tensors saved for backward by ``model(latents, labels)`` over ``micro_batch`` images.

    Enumerated per op of ``models/`` (T = micro_batch * L tokens, R = batch_mul * T head rows, a = 2 bytes
    under bf16/fp16, 4 under "no"; norms, rotary tables, logsumexp and the loss are fp32):

    * backbone block: its two norm inputs (fp32) and rsqrt, the normed inputs of qkv and w13, the qkv
      output (q, k, v are views of it; LatentLM also keeps the rotary outputs q and k and fp32 copies of
      the cos/sin tables), the attention output and logsumexp, SwiGLU's w13 output, silu and product;
      DiT adds its modulated inputs, the outputs the gates multiply, and per image the adaLN vectors.
    * head block (R rows): SiLU(c), the adaLN output (the gate keeps it), norm input (fp32) and output,
      1 + scale, the modulated input, SwiGLU's tensors and the MLP output.
    * checkpointing: a block keeps only its input, in the residual stream's dtype: fp32 for LatentLM's
      backbone under ``autocast`` (its label embedding is fp32, so the stream is promoted), a otherwise.

    ``autocast``: fp32 parameters under ``torch.autocast`` (DDP, as the trainer runs today); False: the
    parameters are themselves in the low-precision dtype (FSDP's gathered bf16 parameters).
    ``attention_out_copy``: also count the copy ``out.transpose(1, 2).reshape`` makes when SDPA returns a
    (B, H, T, hd)-contiguous output, as CPU SDPA does for LatentLM's fp32 rotary queries; CUDA SDPA and
    flash-attn return (B, T, H, hd) memory, so the reshape is a view (the default, False).
    Validated against ``saved_tensor_bytes`` on tiny CPU models in ``tests/test_memory.py``.
    """
    if micro_batch < 1:
        raise ValueError(f"micro_batch={micro_batch}: must be >= 1")
    a = FP32 if mixed_precision == "no" else 2
    n, L, D, F, C, H = micro_batch, cfg.seq_len, cfg.hidden_size, cfg.ffn_dim, cfg.token_dim, cfg.num_heads
    hd = D // H
    Dkv = cfg.kv_heads * hd
    T = n * L
    out_copy = a * T * D if attention_out_copy else 0
    if cfg.family == "dit":
        residual = a  # x_embed output (+ a cast position table): low precision under both regimes
        block = (FP32 * T * (2 * D + 2 + H)  # norm inputs, rsqrt, logsumexp
                 + a * T * (8 * D + 2 * Dkv + 4 * F)  # normed, modulated, qkv, out, gated outputs, SwiGLU
                 + a * n * 9 * D + out_copy)  # SiLU(c), 6 adaLN vectors, two (1 + scale)
        c_bytes = FP32 if autocast or a == FP32 else a  # t_embed (a) + label table (fp32) promotes under autocast
        stem = (a * T * C + a * n * (FREQ_DIM + 2 * D) + c_bytes * n * D + INT64 * n  # embedders, c, labels
                + a * n * 2 * D + FP32 * T * (D + 1) + a * T * 2 * D  # final: SiLU(c), 1 + scale, norm, modulated
                + FP32 * T * C)  # loss: output - target
        head_block, head_depth, R = 0, 0, 0  # no head
    else:
        residual = FP32 if autocast or a == FP32 else a
        R = cfg.batch_mul * T
        block = (FP32 * (T * (2 * D + 2 + H) + 4 * L * hd)  # norm inputs, rsqrt, logsumexp, rotary cos/sin copies
                 + a * T * (4 * D + 3 * Dkv + 4 * F)  # normed x2, qkv, rotated q and k, out, SwiGLU
                 + out_copy)
        head_block = FP32 * R * (D + 1) + a * R * (8 * D + 4 * cfg.head_ffn_dim)
        stem = (a * n * (L - 1) * C + INT64 * n  # token embedder input, labels
                + FP32 * T * (D + 1) + a * T * D  # final norm, cond_proj input
                + a * R * (FREQ_DIM + 2 * D + C + D)  # timestep sinusoid and MLP, input_proj input, c
                + a * R * 4 * D + FP32 * R * (D + 1)  # final layer: SiLU(c), norm in/out, 1 + scale, modulated
                + FP32 * R * C)  # loss: output - target
        head_depth = cfg.head_depth
    if not activation_checkpointing:
        return ActivationBytes(stem=stem, blocks=cfg.depth * block, head_blocks=head_depth * head_block, recompute=0)
    return ActivationBytes(stem=stem, blocks=cfg.depth * residual * T * D,
                           head_blocks=head_depth * a * R * D,  # the head's residual stream is always a
                           recompute=max(block, head_block))


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryPlan:
    """Per-GPU memory of one training setup, in bytes, and whether it fits."""

    model: str
    params: int
    strategy: Strategy
    gpus: int
    micro_batch: int  # images per process per forward: batch_size / (gpus * grad_accum_steps)
    activation_checkpointing: bool
    mixed_precision: Precision
    capacity: int  # the GPU's memory
    weights: int  # fp32 master weights (sharded under FSDP)
    gradients: int  # fp32 gradients (sharded under FSDP)
    optimizer: int  # AdamW exp_avg + exp_avg_sq, fp32 (sharded under FSDP)
    ema: int  # fp32 EMA of the weights (sharded under FSDP)
    buffers: int  # DDP gradient buckets
    weight_copies: int  # DDP: autocast's bf16 weight casts; FSDP: gathered units and their unsharded grads
    activations: int  # saved for backward (+ one recomputed block with checkpointing)
    workspace: int  # autograd's gradient buffers during backward
    optimizer_step: int  # AdamW's temporaries during step() (does not coexist with activations)
    overhead: int  # CUDA context, library workspaces, allocator slack

    @property
    def state(self) -> int:
        """Bytes held for the whole run: weights, gradients, moments, EMA, DDP buckets, overhead."""
        return self.weights + self.gradients + self.optimizer + self.ema + self.buffers + self.overhead

    @property
    def peak(self) -> int:
        """The larger of the forward/backward phase and the optimizer-step phase."""
        return self.state + max(self.weight_copies + self.activations + self.workspace, self.optimizer_step)

    @property
    def headroom(self) -> int:
        """capacity - peak (negative: does not fit)."""
        return self.capacity - self.peak

    @property
    def fits(self) -> bool:
        return self.headroom >= 0


def plan_memory(
    cfg: ModelConfig,
    gpus: int,
    batch_size: int,
    grad_accum_steps: int = 1,
    strategy: Strategy = "ddp",
    activation_checkpointing: bool = False,
    mixed_precision: Precision = "bf16",
    gpu_memory_gb: float = 80,
    overhead_gb: float = 2.0,
) -> MemoryPlan:
    """Per-GPU memory of training ``cfg`` on ``gpus`` GPUs with ``batch_size`` images per optimizer step.

    ``gpu_memory_gb`` is in GiB (2^30 bytes): an "80 GB" H100 has 80 GiB of HBM, of which about 79.1 GiB
    is usable by PyTorch; ``overhead_gb`` (GiB) covers the CUDA context, cuBLAS/NCCL workspaces and
    allocator slack. See the module docstring for what each field assumes.
    """
    if strategy not in ("ddp", "fsdp"):
        raise ValueError(f"strategy={strategy!r}: choose 'ddp' or 'fsdp'")
    if mixed_precision not in ("no", "bf16", "fp16"):
        raise ValueError(f"mixed_precision={mixed_precision!r}: choose 'no', 'bf16' or 'fp16'")
    if gpus < 1 or grad_accum_steps < 1:
        raise ValueError(f"gpus={gpus}, grad_accum_steps={grad_accum_steps}: both must be >= 1")
    if batch_size % (gpus * grad_accum_steps):
        raise ValueError(f"batch_size={batch_size} is not divisible by gpus x grad_accum_steps = {gpus} x "
                         f"{grad_accum_steps}: choose a batch size that is a multiple of {gpus * grad_accum_steps}")
    micro = batch_size // (gpus * grad_accum_steps)
    counts = param_counts(cfg)
    P = counts.total
    low = FP32 if mixed_precision == "no" else 2  # bytes of a low-precision parameter / activation
    shard = gpus if strategy == "fsdp" else 1

    def sharded(bytes_per_param: int) -> int:
        return math.ceil(P / shard) * bytes_per_param

    if strategy == "ddp":
        buffers = FP32 * P
        # autocast's bf16 casts that backward needs; checkpointed blocks re-cast theirs one block at a time
        if activation_checkpointing:
            cast = counts.root_saved_casts + max(counts.block, counts.head_block)
        else:
            cast = counts.root_saved_casts + cfg.depth * counts.block + cfg.head_depth * counts.head_block
        weight_copies = 0 if mixed_precision == "no" else low * cast
    else:
        buffers = 0
        unit = max(counts.block, counts.head_block)
        unsharded_grads = unit * (FP32 if mixed_precision == "no" else low + FP32)  # + fp32 reduce-scatter input
        weight_copies = low * (counts.root + FSDP_BLOCKS_IN_FLIGHT * unit) + unsharded_grads
    acts = activation_bytes(cfg, micro, mixed_precision, activation_checkpointing,
                            autocast=strategy == "ddp")
    T = micro * cfg.seq_len
    rows = T if cfg.family == "dit" else max(T, cfg.batch_mul * T)
    widest = T * cfg.ffn_dim if cfg.family == "dit" else max(T * cfg.ffn_dim, cfg.batch_mul * T * cfg.head_ffn_dim)
    workspace = 2 * widest * 2 * low + rows * cfg.hidden_size * FP32
    return MemoryPlan(
        model=cfg.name, params=P, strategy=strategy, gpus=gpus, micro_batch=micro,
        activation_checkpointing=activation_checkpointing, mixed_precision=mixed_precision,
        capacity=int(gpu_memory_gb * GiB), weights=sharded(FP32), gradients=sharded(FP32),
        optimizer=sharded(2 * FP32), ema=sharded(FP32), buffers=buffers, weight_copies=weight_copies,
        activations=acts.total, workspace=workspace, optimizer_step=sharded(ADAMW_TEMP_BYTES),
        overhead=int(overhead_gb * GiB),
    )


def format_plan(plans: list[MemoryPlan]) -> str:
    """A markdown table of plans, sizes in GiB per GPU."""

    def gib(x: int) -> str:
        return f"{x / GiB:.1f}"

    header = ("| model | params | strategy | AC | micro-batch | weights | grads | AdamW | EMA | DDP buckets "
              "| copies/gathered | activations | workspace | peak | GPU | headroom | fits |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for p in plans:
        sizes = (p.weights, p.gradients, p.optimizer, p.ema, p.buffers, p.weight_copies, p.activations,
                 p.workspace, p.peak, p.capacity, p.headroom)
        ac = "yes" if p.activation_checkpointing else "no"
        lines.append(f"| {p.model} | {p.params / 1e9:.2f}B | {p.strategy} x{p.gpus} | {ac} | {p.micro_batch} | "
                     + " | ".join(gib(x) for x in sizes) + f" | {'yes' if p.fits else 'no'} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Measurement (imports torch; for validating the formulas on real models)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SavedBytes:
    """Distinct storages autograd saved for backward during one call, in bytes."""

    activations: int  # everything that is neither a parameter nor a cast copy of one
    weight_copies: int  # low-precision casts of parameters (autocast)


def saved_tensor_bytes(module, fn) -> SavedBytes:
    """Run ``fn()`` (e.g. ``lambda: model(latents, labels)``) and sum the storages it saves for backward.

    Storages are deduplicated (views of one tensor count once); ``module``'s parameters are left out,
    and so are tensors whose autograd history is a cast of a parameter (autocast's weight copies, seen
    through views and transposes), which are reported separately. ``fn``'s result is dropped on return,
    which frees the graph.
    """
    import torch

    param_storages = {p.untyped_storage().data_ptr() for p in module.parameters()}
    acts: dict[int, int] = {}
    copies: dict[int, int] = {}

    def is_weight_cast(t: torch.Tensor) -> bool:
        node = t.grad_fn
        while node is not None and node.name() in ("TBackward0", "TransposeBackward0", "ViewBackward0"):
            node = node.next_functions[0][0]
        return (node is not None and node.name() == "ToCopyBackward0"
                and type(node.next_functions[0][0]).__name__ == "AccumulateGrad")

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if storage.nbytes() and key not in param_storages:
            (copies if is_weight_cast(t) else acts)[key] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return SavedBytes(activations=sum(acts.values()), weight_copies=sum(copies.values()))
