"""This process's place in a launch: rank, world size, device, barriers — one object for every command.

Commands run unchanged alone, under ``torchrun`` or under ``accelerate launch``: ``Distributed.start``
joins the launch through Accelerate's ``PartialState`` (which reads the launcher's environment and
initialises the process group: NCCL on GPUs, gloo on CPUs) and resolves the device, so nothing else
reads ``RANK``/``LOCAL_RANK`` or picks a device. The trainer's ``Accelerator`` shares the same state.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# The last barrier of sample-many waits for the slowest process's last shard, which can take hours on big
# models; the default 30-minute collective timeout would kill a healthy run.
BARRIER_TIMEOUT = timedelta(hours=48)


def launch_rank() -> int:
    """The launcher's rank of this process (0 when run alone), readable before any process group exists:
    the console entry point uses it to keep INFO logging to the first process."""
    return int(os.environ.get("RANK", "0"))


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """``"auto"``: ``cuda:<local_rank>`` when CUDA is available, else the CPU; otherwise ``torch.device(spec)``.

    Raises ``ConfigError`` for a device string torch does not know or a CUDA device this machine does not have.
    """
    import torch

    from latentlm.config import ConfigError

    if spec != "auto":
        try:
            device = torch.device(spec)
        except RuntimeError as err:
            raise ConfigError(f"device={spec!r}: not a device ({err}); use auto, cpu, cuda or cuda:<index>") from err
        count = torch.cuda.device_count() if device.type == "cuda" else 0
        if device.type == "cuda" and (count == 0 or (device.index or 0) >= count):
            have = f"cuda:0..cuda:{count - 1}" if count else "no CUDA device"
            raise ConfigError(f"device={spec!r}: this machine has {have}; pick one of those, cpu or auto")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


@dataclass(frozen=True)
class Distributed:
    """Rank ``rank`` of ``world_size`` processes (``local_rank`` on its node), working on ``device``."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @classmethod
    def start(cls, device: str = "auto") -> Distributed:
        """Join the launch (a single process is rank 0 of 1) and resolve ``device`` ("auto", "cpu", "cuda:1")."""
        import torch
        from accelerate import PartialState

        cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
        state = PartialState(cpu=cpu, timeout=BARRIER_TIMEOUT)
        resolved = resolve_device(device, state.local_process_index)
        if resolved.type == "cuda":
            torch.cuda.set_device(resolved)
        return cls(state.process_index, state.num_processes, state.local_process_index, resolved)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        """Wait until every process gets here."""
        if self.world_size > 1:
            import torch.distributed

            torch.distributed.barrier()

    def broadcast(self, obj: Any) -> Any:
        """The first process's ``obj`` on every process (any picklable value; the others pass anything)."""
        if self.world_size == 1:
            return obj
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([obj])[0]
