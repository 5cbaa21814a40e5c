"""A tensor-parallel group: which rank of how many this process is, and the two collectives sharded layers need.

A group of one (the default, TP = 1) never calls torch.distributed, so single-process engines and unit tests need no
process group; a unit test may also build TPGroup(rank, size) without one to exercise a rank's weight slicing."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TPGroup:
    rank: int = 0
    size: int = 1
    group: Any = None  # a torch.distributed ProcessGroup; None with size 1 (or in slicing-only tests)

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.size:
            raise ValueError(f"rank {self.rank} is not in a group of {self.size}")

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sums `x` over the group, in place."""
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenates every rank's `x` along the last dimension, in rank order."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def split(self, total: int, what: str) -> int:
        """This rank's share of `total` (heads, rows, ...); an error naming `what` when it does not divide."""
        if total % self.size:
            raise ValueError(f"{what} ({total}) is not divisible by the tensor-parallel size {self.size}")
        return total // self.size


SINGLE = TPGroup()


@dataclass(frozen=True)
class World:
    """Every rank of one engine replica. Rank 0 drives: it schedules, and before each piece of device work it sends
    the others a message (a method name and its arguments) over `control`, a gloo group, so that python objects
    travel the same way over NCCL-backed or CPU ranks."""

    rank: int = 0
    size: int = 1
    tp: TPGroup = SINGLE
    control: Any = None

    def broadcast(self, message: Any) -> None:
        """Rank 0: sends `message` to every other rank."""
        if self.size > 1:
            dist.broadcast_object_list([message], src=0, group=self.control)

    def receive(self) -> Any:
        """Ranks 1..: waits for rank 0's next message."""
        box = [None]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def min(self, value: int) -> int:
        """The smallest of every rank's `value` (ranks agree on sizes measured apart, e.g. the KV cache)."""
        if self.size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=self.control)
        return int(tensor.item())


SINGLE_WORLD = World()


def init_world(rank: int, tp_size: int, device: str, init_method: str) -> World:
    """Joins the process group of `tp_size` ranks (NCCL between GPUs, gloo on the CPU); on CUDA each rank takes the
    GPU of its number."""
    if device == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    else:  # ranks share the cores; more threads than cores spin against each other inside every collective
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // tp_size))
    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=tp_size)
    control = dist.new_group(backend="gloo") if backend == "nccl" else dist.group.WORLD
    return World(rank, tp_size, TPGroup(rank, tp_size, dist.group.WORLD), control)
