"""Riding torchrun and SLURM: which part of the work this process does, and who assembles.

* one process: part 0 of 1, assembles;
* ``--shard K/N`` (a SLURM array task, a CI matrix job): part K of N, writes its own part file
  ``OUT.part-K-of-N.h5``; ``featx merge`` joins the parts later;
* torchrun (``WORLD_SIZE`` > 1): rank R does part R of WORLD_SIZE into the shared shard folder,
  binds GPU ``LOCAL_RANK``; after a barrier rank 0 assembles the single output file.

No scheduler of featx's own: the shard plan is a pure function of the sorted file list.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import torch

from featx.errors import UsageError

T = TypeVar("T")


@dataclass(frozen=True)
class Job:
    """This process's share of the work and its role in it."""

    part: int
    parts: int
    torchrun: bool = False
    local_rank: int = 0
    local_world: int = 1  # torchrun's LOCAL_WORLD_SIZE: the ranks on this node

    @property
    def rank(self) -> int:
        """This process's torchrun rank (0 without torchrun: a ``--shard K/N`` part runs alone
        in its own work folder)."""
        return self.part if self.torchrun else 0

    @property
    def writes_part(self) -> bool:
        """A ``--shard K/N`` part file rather than the final output."""
        return self.parts > 1 and not self.torchrun

    @property
    def leader(self) -> bool:
        """Takes the output lock, creates the shard folder, assembles."""
        return self.writes_part or self.part == 0

    def my_shards(self, shard_count: int) -> range:
        """Part ``part`` of ``parts`` takes a contiguous block of shards, so parts concatenate."""
        return range(
            shard_count * self.part // self.parts, shard_count * (self.part + 1) // self.parts
        )

    def output_lock(self, target: Path) -> contextlib.AbstractContextManager[None]:
        """The leader holds the output's lock for the whole run; other ranks share it."""
        from featx.store.durable import output_lock

        return output_lock(target) if self.leader else contextlib.nullcontext()

    def device(self, device: torch.device) -> torch.device:
        """This process's device: GPU ``LOCAL_RANK`` under torchrun, else the one named; an
        ordinal the machine lacks is one line, not CUDA's "invalid device ordinal"."""
        from featx.runtime.device import bound_device

        if device.type != "cuda":
            return device
        local_rank = self.local_rank if self.torchrun else None
        return bound_device(device, local_rank, torch.cuda.device_count())

    @property
    def ranks_per_node(self) -> int:
        """The processes sharing this node's cores (torchrun's LOCAL_WORLD_SIZE; 1 otherwise)."""
        return self.local_world if self.torchrun else 1

    @contextlib.contextmanager
    def session(self, device: torch.device) -> Iterator[None]:
        """The torch.distributed process group for the duration of the run (torchrun only)."""
        if device.type == "cuda":
            # Every CUDA call of the run, the caching allocator's included, goes to this device:
            # without it `--device cuda:1` also opens a context on GPU 0.
            torch.cuda.set_device(device)
        if not self.torchrun:
            yield
            return
        import torch.distributed as dist

        backend = "nccl" if device.type == "cuda" else "gloo"
        minutes = int(os.environ.get("FEATX_DIST_TIMEOUT_MIN", "720"))
        # Ranks wait for each other only at the end; a slow rank must not time the others out.
        # device_id binds NCCL to this rank's GPU up front (no guess, no hang at the barrier).
        dist.init_process_group(
            backend,
            timeout=timedelta(minutes=minutes),
            device_id=device if device.type == "cuda" else None,
        )
        try:
            yield
        finally:
            dist.destroy_process_group()

    def barrier(self) -> None:
        if self.torchrun:
            import torch.distributed as dist

            dist.barrier()

    def leader_first(self, make: Callable[[bool], T], overwrite: bool) -> T:
        """Run ``make(overwrite)`` on the leader, then (after a barrier) on the other ranks, so
        only the leader ever creates or discards the shared shard folder."""
        if not self.torchrun:
            return make(overwrite)
        if self.leader:
            result = make(overwrite)
            self.barrier()
            return result
        self.barrier()
        return make(False)


def job_for(shard: tuple[int, int] | None) -> Job:
    """The job of this process, from ``--shard`` or torchrun's environment.

    This is the one place that reads ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK`` and
    ``LOCAL_WORLD_SIZE``: each must be a whole number in range, or the run stops with one line
    (paths and devices are chosen by them).
    """
    world = _env_number("WORLD_SIZE", 1, low=1)
    rank = _env_number("RANK", 0, low=0, high=world)
    local_rank = _env_number("LOCAL_RANK", 0, low=0)
    local_world = _env_number("LOCAL_WORLD_SIZE", 1, low=1)
    if world > 1:
        if shard is not None:
            raise UsageError("--shard and torchrun both split the work: use one of them")
        return Job(rank, world, torchrun=True, local_rank=local_rank, local_world=local_world)
    if shard is not None:
        return Job(*shard)
    return Job(0, 1)


_DIGITS = re.compile(r"[0-9]{1,9}")


def _env_number(name: str, default: int, low: int, high: int | None = None) -> int:
    """The environment variable ``name`` as an int in ``[low, high)``; ``default`` when unset."""
    text = os.environ.get(name)
    if text is None:
        return default
    value = int(text) if _DIGITS.fullmatch(text) else None
    if value is None or value < low or (high is not None and value >= high):
        wanted = f"{low} to {high - 1}" if high is not None else f"at least {low}"
        shown = repr(text if len(text) <= 40 else text[:40] + "…")
        raise UsageError(
            f"{name}={shown} in the environment: expected a whole number, {wanted} "
            "(torchrun sets it; unset it to run one process)"
        )
    return value
