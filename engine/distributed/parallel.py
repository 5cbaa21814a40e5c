"""Where a rank sits in its replica: its tensor-parallel group (the two collectives sharded layers need) and its
pipeline stage (the layers it holds, and the neighbours it passes activations to).

A group of one (the default, TP = 1) never calls torch.distributed, so single-process engines and unit tests need no
process group; a unit test may also build TPGroup(rank, size) without one to exercise a rank's weight slicing.
Ranks are numbered stage by stage: rank = stage * tp_size + tp_rank."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from vdeploy_engine.config import stage_layers


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
class Stage:
    """A pipeline stage: the `index`-th of `size` consecutive parts of the model's layers (config.stage_layers). The
    first stage embeds the tokens, the last holds the final norm and the LM head; each passes its activations to the
    rank of the same tensor-parallel rank in the next stage (`next`), a global rank, over the default group."""

    index: int = 0
    size: int = 1
    prev: int | None = None
    next: int | None = None

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.size - 1

    def layers(self, num_layers: int) -> range:
        return stage_layers(num_layers, self.size)[self.index]

    def absent(self, num_layers: int, layers: str, first: tuple[str, ...], last: tuple[str, ...]) -> tuple[str, ...]:
        """Parameter-name prefixes of what other stages hold, which a loader skips: the layers outside this stage's
        (`layers` + number), the first stage's parts `first` and the last stage's parts `last`."""
        held = self.layers(num_layers)
        return (
            tuple(f"{layers}{i}." for i in range(num_layers) if i not in held)
            + (() if self.is_first else first)
            + (() if self.is_last else last)
        )

    def send(self, x: torch.Tensor) -> Any:
        """Starts sending `x` to the next stage; returns the handle to wait on (`x` must live until then)."""
        return dist.isend(x, self.next)

    def receive(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The previous stage's next activations."""
        x = torch.empty(shape, dtype=dtype, device=device)
        dist.recv(x, self.prev)
        return x


WHOLE = Stage()


@dataclass(frozen=True)
class World:
    """Every rank of one engine replica. Rank 0 drives: it schedules, and before each piece of device work it sends
    the others a message (a method name and its arguments) over `control`, a gloo group, so that python objects
    travel the same way over NCCL-backed or CPU ranks."""

    rank: int = 0
    size: int = 1
    tp: TPGroup = SINGLE
    control: Any = None
    stage: Stage = WHOLE

    @property
    def sampler_rank(self) -> int:
        """The rank whose logits rank 0 samples: tensor-parallel rank 0 of the last stage."""
        return self.size - self.tp.size

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


def init_world(
    rank: int, tp_size: int, pp_size: int, device: str, init_method: str, gpu: int | None = None
) -> World:
    """Joins the process group of tp_size x pp_size ranks (NCCL between GPUs, gloo on the CPU); on CUDA each rank
    takes the GPU of its number, or `gpu` when a scheduler (Ray) picked one."""
    size = tp_size * pp_size
    if device == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count() if gpu is None else gpu)
    else:  # ranks share the cores; more threads than cores spin against each other inside every collective
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // size))
    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size)
    control = dist.new_group(backend="gloo") if backend == "nccl" else dist.group.WORLD
    index = rank // tp_size
    if pp_size == 1:
        tp_group = dist.group.WORLD
    else:  # every rank creates every stage's group, in the same order (new_group is collective)
        groups = [dist.new_group(list(range(s * tp_size, (s + 1) * tp_size))) for s in range(pp_size)]
        tp_group = groups[index] if tp_size > 1 else None
    stage = Stage(index, pp_size, rank - tp_size if index > 0 else None, rank + tp_size if index < pp_size - 1 else None)
    return World(rank, size, TPGroup(rank % tp_size, tp_size, tp_group), control, stage)
