"""The few collectives the trainers need, and the same calls as no-ops on one process.

bundleflow uses Accelerate to start and describe the processes (``accelerate launch``,
torchrun, the device of each rank) and ``torch.distributed`` directly for the handful of
collectives below. Nothing here runs a collective unless there are several processes.
"""

from __future__ import annotations

import atexit
import os
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

HELD_TENSORS = 8
"""How many of the last collectives' tensors :class:`Comm` keeps referenced (see
:func:`_hold`): more than the Gloo worker threads (2) can hold at once."""
_held: deque[Tensor] = deque(maxlen=HELD_TENSORS)


def _hold(*tensors: Tensor) -> None:
    """Keep Python references to a collective's tensors until the group is destroyed.

    Why (issue 28, torch 2.5.1): a Gloo worker thread drops its reference to a finished
    collective's work object a moment after ``wait()`` has returned. If Python no longer
    holds the work's tensors by then, the worker frees them, and freeing a tensor that
    Python created needs the GIL. The main thread may already be in
    ``destroy_process_group``, which holds the GIL in ``~ProcessGroupGloo`` while it joins
    the worker threads: both wait forever (py-spy: the main thread in
    ``std::thread::join`` under ``~ProcessGroupGloo``, a worker in
    ``gil_scoped_acquire`` under ``~AsyncWork``). With the tensors still referenced here the
    worker's release frees nothing, so it never needs the GIL.
    """
    _held.extend(tensors)


def before_process_group() -> None:
    """Call before the process group is created (``Accelerator()``, ``init_process_group``)
    when ``WORLD_SIZE`` > 1; a no-op on one process.

    Why (issue 28): ``torch._dynamo`` is imported lazily, by the first ``torch.optim``
    optimizer built. Imported *after* the group exists, it keeps a reference to the default
    group, so ``destroy_process_group()`` no longer destroys the Gloo backend: its two worker
    threads (``pt_gloo_runloop``) and its transport thread (``gloo_tcp_loop``) are still
    running when the interpreter exits, and the backend is torn down during finalization
    with them alive. Under CPU contention a rank then dies in ``std::terminate`` ("terminate
    called without an active exception", SIGABRT) after a clean stop. Imported before, the
    group has no such holder and ``destroy_process_group()`` joins those threads. The atexit
    hook destroys the group on every other way out (an exception, a second Ctrl-C) while the
    interpreter is still whole; the group is local, so no peer is needed for it.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    import torch._dynamo  # noqa: F401 - the import order is the fix, see above

    atexit.register(leave_process_group)


def leave_process_group() -> None:
    """Destroy the default process group if it still exists (local: no collective); then
    let go of the collectives' tensors (:func:`_hold`)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _held.clear()


def gloo_threads() -> list[str]:
    """Names of this process's native Gloo threads (Linux; empty elsewhere): after
    :func:`leave_process_group` there must be none."""
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        return []
    names = []
    for task in tasks.iterdir():
        try:
            name = (task / "comm").read_text().strip()
        except OSError:  # the thread ended meanwhile
            continue
        if "gloo" in name:
            names.append(name)
    return sorted(names)


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
            _hold(tensor)
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
        padded = padded.contiguous()
        _hold(padded, *parts)
        dist.all_gather(parts, padded)
        return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)], dim=0)

    def broadcast_floats(self, values: list[float], device: torch.device) -> list[float]:
        """The main process's ``values`` on every rank (one host synchronisation)."""
        if not self.active:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        _hold(tensor)
        dist.broadcast(tensor, src=0)
        return tensor.tolist()

    def barrier(self) -> None:
        if self.active:
            dist.barrier()
