"""``--strategy fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``) for the trainer, and its sharded checkpoints.

What is sharded: every process holds 1/world of the fp32 weights, their gradients, AdamW's two moments and
the EMA (sharded exactly like the weights, so its update is local). Each backbone block and each head
block is one FSDP unit (gathered for its forward and again for its backward, then freed); the embedders,
the condition layer and the final layers form the root unit. Under ``mixed_precision=bf16`` a unit is
gathered in bf16 and its gradients are reduce-scattered in fp32 (``MixedPrecisionPolicy``).

Why ``fully_shard`` directly and not Accelerate's FSDP plugin: Accelerate 1.15 turns its FSDP path on only
for accelerator device types (``DistributedType.FSDP`` is never set for ``MULTI_CPU``), so it could not be
tested on CPUs with gloo, and it ties FSDP's mixed precision to the ``Accelerator``'s process-wide
``mixed_precision``, which the trainer keeps at "no" (``loop.make_accelerator``). Launching is unchanged:
``accelerate launch`` and ``torchrun`` start the processes, ``Distributed.start`` joins them.

Checkpoints: ``save`` writes ``{"model", "ema", "optimizer"}`` with ``torch.distributed.checkpoint`` into
``<step>/sharded/`` (one ``.distcp`` file per process and a ``.metadata``), beside the small JSON files; the
``COMPLETE`` marker is still written last. ``load`` reads them back on any number of processes: DCP
reshards on load, so a run can resume on another world size (the data order then continues approximately).
``latentlm.checkpoint.Checkpoint`` reads such a checkpoint's weights consolidated, in one process.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from latentlm.checkpoint import SHARDED_DIR, Checkpoint, CorruptCheckpoint, NonFiniteWeightsError
from latentlm.distributed import Distributed


def ensure_process_group(dist: Distributed) -> None:
    """FSDP needs a process group even for one process (``latentlm train --strategy fsdp`` without a
    launcher): create a one-member group when the launch did not."""
    if not torch_dist.is_initialized():
        torch_dist.init_process_group("cpu:gloo,cuda:nccl" if dist.device.type == "cuda" else "gloo",
                                      store=torch_dist.HashStore(), rank=0, world_size=1,
                                      timeout=datetime.timedelta(hours=48))


def units(model: nn.Module) -> list[nn.Module]:
    """The FSDP units below the root: every backbone block, then (LatentLM) every head block."""
    head = getattr(model, "head", None)
    return [*model.blocks, *(head.blocks if head is not None else [])]


def shard(model: nn.Module, dist: Distributed, mixed_precision: str | None) -> nn.Module:
    """``model`` (on ``dist.device``) sharded in place over all processes: one unit per block, the rest in the
    root. ``mixed_precision="bf16"``: units are gathered in bf16 and gradients reduced in fp32; the root
    leaves its inputs alone (latents and labels stay fp32/int64, the model casts at its embedders)."""
    ensure_process_group(dist)
    mesh = init_device_mesh(dist.device.type, (dist.world_size,))
    low = torch.bfloat16 if mixed_precision == "bf16" else None  # fp16 is refused (TrainConfig.validate)
    policy = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32)
    root_policy = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32, cast_forward_inputs=False)
    for block in units(model):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=root_policy)
    return model


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the sharded gradients to a global L2 norm of ``max_norm``; returns the norm before clipping
    (a plain tensor, the same on every process)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_([p for p in model.parameters() if p.grad is not None], max_norm, total)
    return total


def check_finite(**modules: nn.Module) -> None:
    """Raise ``NonFiniteWeightsError`` on every process when any process's shard of a module has NaN/inf."""
    local = [[_local(p) for p in module.parameters()] for module in modules.values()]
    device = local[0][0].device  # NCCL reduces device tensors only
    flags = torch.stack([sum((~torch.isfinite(t)).sum() for t in tensors).float().clamp(max=1).to(device)
                         for tensors in local])  # (modules,): 1 where this process's shard has NaN/inf
    torch_dist.all_reduce(flags, op=torch_dist.ReduceOp.MAX)
    if flags.any():
        names = [name for name, flag in zip(modules, flags.tolist(), strict=True) if flag]
        raise NonFiniteWeightsError(f"{', '.join(names)} weights have NaN/inf values; refusing to checkpoint them")


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _state(model: nn.Module, ema: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    return {"model": get_model_state_dict(model), "ema": get_model_state_dict(ema),
            "optimizer": get_optimizer_state_dict(model, optimizer)}


def save(path: Path, model: nn.Module, ema: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every process writes its shards of the weights, the EMA and the optimizer into ``path/sharded``."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_state(model, ema, optimizer), checkpoint_id=path / SHARDED_DIR)


def verify_shards(saved: Checkpoint, dist: Distributed) -> None:
    """Check the sha256 of ``saved``'s shard files against its marker, each file hashed by one process (file i
    by process i mod world); raises ``CorruptCheckpoint`` on every process when any file differs."""
    problem = None
    try:
        for name in saved.shard_files()[dist.rank::dist.world_size]:
            saved.verify_file(name)
    except CorruptCheckpoint as err:
        problem = str(err)
    problems = [None] * dist.world_size
    torch_dist.all_gather_object(problems, problem)
    found = [p for p in problems if p is not None]
    if found:
        raise CorruptCheckpoint(found[0])


def load(saved: Checkpoint, model: nn.Module, ema: nn.Module, optimizer: torch.optim.Optimizer,
         dist: Distributed) -> None:
    """Read ``saved``'s ``sharded/`` folder, its hashes checked first, into the sharded ``model``, ``ema`` and
    ``optimizer`` (any world size)."""
    import torch.distributed.checkpoint as dcp

    verify_shards(saved, dist)
    state = _state(model, ema, optimizer)
    dcp.load(state, checkpoint_id=saved.path / SHARDED_DIR)
    set_model_state_dict(model, state["model"])
    set_model_state_dict(ema, state["ema"])
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole fp32 state of a sharded ``model`` on the CPU of the first process (empty elsewhere).
    Every process must call it (it gathers)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
