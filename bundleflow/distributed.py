"""The few collectives the trainers need, and the same calls as no-ops on one process.

bundleflow uses Accelerate to start and describe the processes (``accelerate launch``,
torchrun, the device of each rank) and ``torch.distributed`` directly for the handful of
collectives below. Nothing here runs a collective unless there are several processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


def shard_sizes(n: int, world: int) -> list[int]:
    """Rows per rank when ``n`` rows are split over ``world`` ranks (first ranks get one more)."""
    return [n // world + (1 if r < n % world else 0) for r in range(world)]


@dataclass(frozen=True)
class Comm:
    """This process's place among ``world`` processes."""

    rank: int = 0
    world: int = 1

    @classmethod
    def from_accelerator(cls, accelerator) -> Comm:
        if accelerator is None or accelerator.num_processes <= 1:
            return cls()
        return cls(rank=accelerator.process_index, world=accelerator.num_processes)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def shard(self, n: int) -> tuple[int, int]:
        """``[lo, hi)``: the rows of ``n`` this rank owns."""
        sizes = shard_sizes(n, self.world)
        lo = sum(sizes[: self.rank])
        return lo, lo + sizes[self.rank]

    def all_reduce(self, tensor: Tensor, op: str = "sum") -> Tensor:
        """In place over all ranks (``sum``, ``max`` or ``min``); returns ``tensor``."""
        if self.active:
            ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
            dist.all_reduce(tensor, op=ops[op])
        return tensor

    def all_gather_rows(self, tensor: Tensor, n: int) -> Tensor:
        """Concatenate every rank's shard (``tensor`` holds this rank's rows of ``n``)."""
        if not self.active:
            return tensor
        sizes = shard_sizes(n, self.world)
        width = max(sizes)
        padded = tensor.new_zeros((width, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)], dim=0)

    def broadcast_floats(self, values: list[float], device: torch.device) -> list[float]:
        """The main process's ``values`` on every rank (one host synchronisation)."""
        if not self.active:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.broadcast(tensor, src=0)
        return tensor.tolist()

    def barrier(self) -> None:
        if self.active:
            dist.barrier()
