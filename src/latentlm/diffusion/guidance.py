"""Classifier-free guidance: combining conditional and unconditional predictions."""

from __future__ import annotations

from torch import Tensor

CFG_SCHEDULES = ("constant", "linear")


def guidance_combine(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """uncond + scale·(cond - uncond) on **all** channels (N, ...) -> (N, ...).

    Applies to whatever the network predicts (ε, v or flow velocity): all are affine in the
    score, so guiding the raw output is guiding the score. Written as cond + (scale - 1)·(cond -
    uncond), the same value, so that scale 1 returns ``cond`` bit for bit.
    """
    return cond + (scale - 1) * (cond - uncond)


def guidance_scale_at(index: int, length: int, scale: float, schedule: str) -> float:
    """Guidance scale for token ``index`` (0-based) of ``length`` tokens.

    ``constant``: ``scale``. ``linear``: 1 + (scale - 1)·(index + 1)/length — MAR's schedule, weak
    guidance for the first tokens and the full scale at the last.
    """
    if schedule == "constant":
        return scale
    if schedule == "linear":
        return 1 + (scale - 1) * (index + 1) / length
    raise ValueError(f"cfg_schedule={schedule!r}: must be one of {CFG_SCHEDULES}")
