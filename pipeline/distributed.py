"""torchrun support: who this process is, the process group, and the per-rank batch shard.

``torchrun --nproc_per_node N -m pipeline.train`` sets RANK / WORLD_SIZE / LOCAL_RANK; a
plain ``python -m pipeline.train`` is a world of one and none of this does anything.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from pipeline.errors import StageError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


def world_from_env() -> World:
    return World(
        rank=int(os.environ.get("RANK", 0)),
        size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )


@contextlib.contextmanager
def process_group(world: World, device: torch.device) -> Iterator[None]:
    """NCCL between GPUs, gloo between CPU processes; torn down even when training fails."""
    if not world.active:
        yield
        return
    import torch.distributed as dist

    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def shard_batches(order: torch.Tensor, batch_size: int, world: World) -> list[torch.Tensor]:
    """This rank's part of each global batch.

    Every rank walks the same seeded order in global batches of ``batch_size``, so an epoch
    has the same steps and the same global batches as single-process training. The order is
    padded by wrapping around (as DistributedSampler does) so that every rank gets an equal,
    non-empty share of every batch: DDP needs each rank to take each step.
    """
    if batch_size % world.size:
        raise StageError(
            f"train.batch_size {batch_size} must be a multiple of the {world.size} processes"
        )
    padding = -len(order) % world.size
    if padding:
        order = torch.cat([order, order[:padding]])
    return [batch[world.rank :: world.size] for batch in order.split(batch_size)]


def all_sum(values: list[float], world: World, device: torch.device) -> list[float]:
    """Sum per-rank statistics (loss totals, counts) across the world."""
    if not world.active:
        return values
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()
