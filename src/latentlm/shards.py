"""Fixed-shard plans: work cut into shards by index, shared by any number of processes, resumable.

``sample-many`` (images k = 0..N-1) and ``cache-latents`` (dataset items) both cut their work this
way. Layout of a shard directory::

    plan.json             what is being produced; a rerun must agree with it. Written first, by process 0.
    shard-000012.<ext>    items [12 P, 13 P) for P items per shard. Written to a temporary name and
                          renamed, so a shard file that exists is complete.

Shard boundaries are fixed by index, so a shard's contents never depend on who computes it. After the
plan is settled, every process lists the finished shards (a barrier makes sure nobody writes a new one
before everyone has looked), and takes every W-th of the missing ones: no two processes ever write the
same file, and a resumed run deals out only what is left, so it stays balanced. Writers stage each shard
under a temporary name (``latentlm.io.atomic_write``), so a killed run leaves whole shards plus temporary
files; the next run removes those and computes the missing shards.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from latentlm.config import ConfigError
from latentlm.distributed import Distributed
from latentlm.io import read_json, remove_stale_temporaries, write_json

PLAN = "plan.json"
_SHARD = re.compile(r"^shard-(\d{6,})\.")


def shard_name(shard: int, suffix: str) -> str:
    """``shard-000012<suffix>``: the one naming scheme of shard files."""
    return f"shard-{shard:06d}{suffix}"


@dataclass(frozen=True)
class ShardPlan:
    """``num_items`` items in shards of ``items_per_shard`` consecutive indices (the last may be shorter)."""

    num_items: int
    items_per_shard: int

    @property
    def num_shards(self) -> int:
        return -(-self.num_items // self.items_per_shard)

    def bounds(self, shard: int) -> tuple[int, int]:
        """``[start, stop)`` item indices of ``shard``."""
        start = shard * self.items_per_shard
        return start, min(start + self.items_per_shard, self.num_items)


def assign_shards(pending: list[int], rank: int, world_size: int) -> list[int]:
    """The shards process ``rank`` computes: every ``world_size``-th of the sorted pending ones."""
    return sorted(pending)[rank::world_size]


def _difference(found: Any, wanted: Any) -> str:
    """The first nested setting that differs, e.g. ``cfg_scale: 2.0 there, 3.0 now``."""
    if isinstance(found, dict) and isinstance(wanted, dict):
        key = min(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))
        return f"{key}: {_difference(found.get(key), wanted.get(key))}"
    return f"{json.dumps(found)[:100]} there, {json.dumps(wanted)[:100]} now"


def check_same_settings(found: dict[str, Any], wanted: dict[str, Any], where: Path | str, what: str) -> None:
    """Raise ``ConfigError`` naming up to four settings that differ between ``found`` (on disk) and ``wanted``."""
    diff = sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))
    if diff:
        detail = "; ".join(f"{k}: {_difference(found.get(k), wanted.get(k))}" for k in diff[:4])
        raise ConfigError(f"{where} holds {what} made with other settings ({detail}); delete it, or pass a "
                          "different --out, or rerun with the same options")


class ShardDir:
    """The shard files ``shard-<s><suffix>`` of a plan in ``root``, and the plan file (``root/plan.json``
    unless ``plan_file`` puts it elsewhere, e.g. beside the shard folder)."""

    def __init__(self, root: str | Path, plan: ShardPlan, suffix: str, plan_file: str | Path | None = None) -> None:
        self.root, self.plan, self.suffix = Path(root), plan, suffix
        self.plan_file = Path(plan_file) if plan_file is not None else self.root / PLAN

    def path(self, shard: int) -> Path:
        return self.root / shard_name(shard, self.suffix)

    def finished(self) -> list[int]:
        """The shards whose files exist (each one is complete: they are renamed into place)."""
        if not self.root.is_dir():
            return []
        found = {int(m.group(1)) for p in self.root.iterdir()
                 if (m := _SHARD.match(p.name)) and p.name.endswith(self.suffix)}
        return sorted(s for s in found if s < self.plan.num_shards)

    def missing(self) -> list[int]:
        done = set(self.finished())
        return [s for s in range(self.plan.num_shards) if s not in done]

    def open(self, dist: Distributed, settings: dict[str, Any], identity: Callable[[dict], dict], what: str,
             prepare: Callable[[dict[str, Any]], dict[str, Any]] | None = None
             ) -> tuple[dict[str, Any], list[int], list[int]]:
        """Settle the plan and deal out the missing shards: ``(plan on disk, missing shards, this process's)``.

        The first process creates the directory, removes temporary files a killed run left, and either
        checks an existing plan file (``identity`` of both must agree: it names what decides the bytes)
        or writes ``prepare(settings)`` (e.g. with statistics computed once) as the new plan. A refusal
        reaches every process as the same ``ConfigError``. Run it in every process of the launch.
        """
        error = None
        if dist.is_main:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                for folder in {self.root, self.plan_file.parent}:  # nobody writes yet: the others wait below
                    remove_stale_temporaries(folder)
                if self.plan_file.is_file():
                    found = identity(read_json(self.plan_file))
                    check_same_settings(found, identity(settings), self.plan_file.parent, what)
                else:
                    write_json(self.plan_file, prepare(settings) if prepare else settings)
            except ValueError as err:  # ConfigError, or prepare's (e.g. constant latents): bad input either way
                error = str(err)
        error = dist.broadcast(error)
        if error is not None:
            raise ConfigError(error)
        dist.barrier()
        plan = read_json(self.plan_file)
        pending = self.missing()
        dist.barrier()  # everyone has listed the finished shards before anyone writes a new one
        return plan, pending, assign_shards(pending, dist.rank, dist.world_size)
