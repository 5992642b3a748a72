"""The reference LatentLM code's Transformer and DiT weights in our layout, mapped exactly.

The reference code (microsoft/unilm, folder ``LatentLM/``: ``models/Transformer.py``, ``models/DiT.py``)
computes the same functions as our models under other names and three other conventions:

* **Patch embedders** are ``Conv2d(C, D, p, p)`` with bias: our ``Linear(C p², D)`` with bias on tokens
  flattened as (C, p, p) is the same map (``weight.reshape(D, -1)``).
* **Token outputs** are ordered (p, p, C), channels fastest (``unpatchify``'s ``'nhwpqc->nchpwq'``);
  ours (C, p, p). The final projection's rows are permuted.
* **Rotary embedding** is interleaved (pairs (x[2i], x[2i+1])) with ``linspace`` frequencies
  1 / 10000^(i / (hd/2 - 1)). The frequencies are ``ModelConfig.rope_frequencies = "linspace"``. The
  interleaved rotation is our rotate-half rotation of q and k with each head's dimensions reordered
  [0, 2, 4, ..., 1, 3, 5, ...]: the q and k rows of ``qkv`` are permuted, and since attention only uses
  q · k, the scores — and every output — are exactly the reference's (the KV cache holds permuted keys).
* **DiT positions** are MAE's 2-D sin-cos table, column first, stored as a frozen float32 parameter
  (``ModelConfig.position_table = "mae"``; the stored table is checked against it, then dropped).

SwiGLU's ``fc1`` (under the SiLU) and ``gate`` become our fused ``w13 = [fc1; gate]``, ``fc2`` our ``w2``.
Everything else (timestep embedder, label table with the null class last, adaLN modulations, condition
layer) maps by name. The maps act row-wise on tensors of a parameter's shape, so they convert AdamW's
moments as well as the weights.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

import torch

from latentlm.config import ConfigError, ModelConfig, ProcessConfig

Tensor = torch.Tensor


def parameter_order(family: str, depth: int, head_depth: int) -> list[str]:
    """The reference model's ``parameters()`` (= ``state_dict()``) keys in order: what its EMA's positional
    ``shadow_params`` list follows."""
    swiglu = ("mlp.fc1.weight", "mlp.gate.weight", "mlp.fc2.weight")
    if family == "latentlm":
        keys = ["x_embedder.proj.weight", "x_embedder.proj.bias", "noisy_x_embedder.proj.weight",
                "noisy_x_embedder.proj.bias", "t_embedder.mlp.0.weight", "t_embedder.mlp.2.weight",
                "y_embedder.embedding_table.weight"]
        for i in range(depth):
            keys += [f"blocks.{i}.attn.qkv.weight", f"blocks.{i}.attn.proj.weight"]
            keys += [f"blocks.{i}.{k}" for k in swiglu]
        for i in range(head_depth):
            keys += [f"diffusion_blocks.{i}.{k}" for k in swiglu] + [f"diffusion_blocks.{i}.adaLN_modulation.1.weight"]
        return keys + ["condition_layer.linear.weight", "final_layer.linear.weight",
                       "final_layer.adaLN_modulation.1.weight"]
    keys = ["pos_embed", "x_embedder.proj.weight", "x_embedder.proj.bias", "t_embedder.mlp.0.weight",
            "t_embedder.mlp.2.weight", "y_embedder.embedding_table.weight"]
    for i in range(depth):
        keys += [f"blocks.{i}.attn.qkv.weight", f"blocks.{i}.attn.proj.weight"] + [f"blocks.{i}.{k}" for k in swiglu]
        keys.append(f"blocks.{i}.adaLN_modulation.1.weight")
    return keys + ["final_layer.linear.weight", "final_layer.adaLN_modulation.1.weight"]


def _count(state: dict[str, Tensor], pattern: str) -> int:
    return len({m.group(1) for k in state if (m := re.match(pattern, k))})


def family_of(state: dict[str, Tensor]) -> str:
    """"latentlm" (a ``Transformer`` checkpoint) or "dit"; ``ConfigError`` for anything else."""
    if "noisy_x_embedder.proj.weight" in state:
        return "latentlm"
    if "pos_embed" in state and "x_embedder.proj.weight" in state:
        return "dit"
    found = sorted(state)[:6]
    raise ConfigError(f"the weights are neither the reference code's Transformer (no noisy_x_embedder.proj.weight) "
                      f"nor its DiT (no pos_embed); keys found: {found}...")


def read_architecture(state: dict[str, Tensor], num_heads: int, input_size: int, name: str,
                      process: ProcessConfig, batch_mul: int) -> ModelConfig:
    """Our ``ModelConfig`` of a reference state dict. ``num_heads`` cannot be read from the shapes (give the
    preset's); ``input_size`` (the latent grid side) comes from the tokenizer. The key set is checked
    against the architecture the shapes describe; ``ConfigError`` names the first key that does not fit."""
    family = family_of(state)
    embed = state["x_embedder.proj.weight"]  # (D, C, p, p)
    hidden, channels, patch = embed.shape[0], embed.shape[1], embed.shape[2]
    depth = _count(state, r"blocks\.(\d+)\.")
    head_depth = _count(state, r"diffusion_blocks\.(\d+)\.")
    expected = parameter_order(family, depth, head_depth)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ConfigError(f"the weights do not fit a reference {family} of depth {depth}: missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]} (a renamed or foreign key?)")
    if hidden % num_heads:
        raise ConfigError(f"hidden size {hidden} is not divisible by num_heads={num_heads}: pass the run's --model")
    head_dim = hidden // num_heads
    kv_rows = state["blocks.0.attn.qkv.weight"].shape[0] - hidden
    cfg = ModelConfig(
        name=name, family=family, in_channels=channels, input_size=input_size, patch_size=patch,
        num_classes=state["y_embedder.embedding_table.weight"].shape[0] - 1,  # the null class is the last row
        depth=depth, hidden_size=hidden, num_heads=num_heads, num_kv_heads=kv_rows // (2 * head_dim),
        ffn_hidden_size=state["blocks.0.mlp.fc1.weight"].shape[0], head_depth=max(head_depth, 1),
        batch_mul=batch_mul, process=process,
        rope_frequencies="linspace", position_table="mae" if family == "dit" else "sincos",
    )
    try:
        cfg.validate()
    except ConfigError as err:
        raise ConfigError(f"the weights describe an invalid model: {err}") from err
    if family == "dit" and state["pos_embed"].shape[1] != cfg.seq_len:
        raise ConfigError(f"pos_embed has {state['pos_embed'].shape[1]} positions but the tokenizer gives "
                          f"{cfg.seq_len} tokens at this image size: pass the run's --image-size")
    return cfg


# ---------------------------------------------------------------------------------------------
# The tensor maps
# ---------------------------------------------------------------------------------------------


def _halves_order(head_dim: int) -> Tensor:
    """Within one head: interleaved pairs -> rotate-half layout (evens first, then odds)."""
    return torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])


def _qkv_rows(cfg: ModelConfig) -> Tensor:
    """Row order of our ``qkv`` from the reference's: every q and k head reordered, v untouched."""
    hd = cfg.hidden_size // cfg.num_heads
    heads = [h * hd + _halves_order(hd) for h in range(cfg.num_heads + cfg.kv_heads)]
    v = torch.arange((cfg.num_heads + cfg.kv_heads) * hd, (cfg.num_heads + 2 * cfg.kv_heads) * hd)
    return torch.cat([*heads, v])


def _output_rows(cfg: ModelConfig) -> Tensor:
    """Rows (C, p, p) of our final projection from the reference's (p, p, C)."""
    c, p = cfg.in_channels, cfg.patch_size
    return torch.arange(p * p * c).reshape(p, p, c).permute(2, 0, 1).reshape(-1)


def _same(t: Tensor) -> Tensor:
    return t


def _rows(rows: Tensor, t: Tensor) -> Tensor:
    return t[rows]


def _fused(fc1: Tensor, gate: Tensor) -> Tensor:
    return torch.cat([fc1, gate])  # our w13 = [silu's input; the gate]


def _maps(cfg: ModelConfig) -> dict[str, tuple[tuple[str, ...], Callable[..., Tensor]]]:
    """Our key -> (the reference keys it is made of, how)."""
    lm = cfg.family == "latentlm"
    flat = functools.partial(torch.reshape, shape=(cfg.hidden_size, -1))  # conv (D, C, p, p) -> linear (D, C p^2)
    output = functools.partial(_rows, _output_rows(cfg))
    qkv = functools.partial(_rows, _qkv_rows(cfg)) if lm else _same
    top = "head." if lm else ""
    maps: dict[str, tuple[tuple[str, ...], Callable[..., Tensor]]] = {
        "token_embed.weight": (("x_embedder.proj.weight",), flat),
        "token_embed.bias": (("x_embedder.proj.bias",), _same),
        "label_embed.table.weight": (("y_embedder.embedding_table.weight",), _same),
        f"{top}time_embed.mlp.0.weight": (("t_embedder.mlp.0.weight",), _same),
        f"{top}time_embed.mlp.2.weight": (("t_embedder.mlp.2.weight",), _same),
        f"{top}final.linear.weight": (("final_layer.linear.weight",), output),
        f"{top}final.adaLN.1.weight": (("final_layer.adaLN_modulation.1.weight",), _same),
    }
    for i in range(cfg.depth):
        ours, theirs = f"blocks.{i}.", f"blocks.{i}."
        maps[ours + "attn.qkv.weight"] = ((theirs + "attn.qkv.weight",), qkv)
        maps[ours + "attn.proj.weight"] = ((theirs + "attn.proj.weight",), _same)
        maps[ours + "mlp.w13.weight"] = ((theirs + "mlp.fc1.weight", theirs + "mlp.gate.weight"), _fused)
        maps[ours + "mlp.w2.weight"] = ((theirs + "mlp.fc2.weight",), _same)
        if not lm:
            maps[ours + "adaLN.1.weight"] = ((theirs + "adaLN_modulation.1.weight",), _same)
    if lm:
        maps["head.input_proj.weight"] = (("noisy_x_embedder.proj.weight",), flat)
        maps["head.input_proj.bias"] = (("noisy_x_embedder.proj.bias",), _same)
        maps["cond_proj.weight"] = (("condition_layer.linear.weight",), _same)
        for i in range(cfg.head_depth):
            ours, theirs = f"head.blocks.{i}.", f"diffusion_blocks.{i}."
            maps[ours + "mlp.w13.weight"] = ((theirs + "mlp.fc1.weight", theirs + "mlp.gate.weight"), _fused)
            maps[ours + "mlp.w2.weight"] = ((theirs + "mlp.fc2.weight",), _same)
            maps[ours + "adaLN.1.weight"] = ((theirs + "adaLN_modulation.1.weight",), _same)
    return maps


def convert(tensors: dict[str, Any], cfg: ModelConfig) -> dict[str, Any]:
    """Our state dict (or any per-parameter tensors, e.g. AdamW moments) from the reference's, by name."""
    return {ours: fn(*(tensors[k] for k in theirs)) for ours, (theirs, fn) in _maps(cfg).items()}


def check_position_table(stored: Tensor, table: Tensor) -> None:
    """The stored DiT ``pos_embed`` (1, L, D) must be MAE's table (float32 values) that we compute."""
    if stored.shape[1:] != table.shape or not torch.allclose(stored[0].double(), table, rtol=0, atol=1e-6):
        raise ConfigError("the checkpoint's pos_embed is not MAE's 2-D sin-cos table for this grid and width; "
                          "it cannot be reproduced (was it trained with a learned position table?)")
