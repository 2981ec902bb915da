"""A training run's health: a device-side finiteness flag, read on the host every k steps.

Reading ``loss.item()`` every step forces a host sync and stalls a CUDA (graph) pipeline.
:class:`FiniteGuard` instead keeps one boolean tensor on the device, and-ed with "loss and
parameters are finite" each step (no sync), and reads it once per check.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from bundleflow.errors import BundleflowError


class FiniteGuard:
    """Accumulate "loss and parameters finite" on the device; raise on the first bad check.

    Usage in a training loop (k = steps between checks, e.g. ``stage2.log_every``)::

        guard = FiniteGuard(device, stage="stage 2", all_reduce_min=reduce_min_or_None)
        for step in ...:
            loss = trainer.step()
            guard.update(loss, net.parameters())     # device-side, no host sync
            if step % k == 0:
                guard.check(step, last_good=latest_checkpoint_path)  # one host sync
            if step % checkpoint_every == 0:
                guard.check(step, last_good=...)      # check *before* writing a checkpoint
                save_checkpoint(...)

    ``check`` raises :class:`BundleflowError` naming the window ``(A, B]`` of steps since
    the last good check, the last good checkpoint and the fix; otherwise it records ``step``
    as good. With several processes pass ``all_reduce_min``: a callable that takes the
    int32 flag tensor and returns it MIN-reduced over all ranks (e.g.
    ``lambda t: accelerator.reduce(t, reduction="min")``, or ``torch.distributed.all_reduce``
    with ``ReduceOp.MIN`` in a wrapper), so every rank raises at the same check and none
    is left waiting in a collective. Every rank must call ``check`` at the same steps.
    """

    def __init__(
        self,
        device: torch.device | str,
        *,
        stage: str = "stage 2",
        all_reduce_min: Callable[[Tensor], Tensor] | None = None,
        fix: str = "lower stage2.lr / stage2.price_lr or the λ cap (stage2.inv_temp.cap)",
    ) -> None:
        self.device = torch.device(device)
        self.stage = stage
        self.fix = fix
        self._reduce = all_reduce_min
        self._ok = torch.ones((), dtype=torch.bool, device=self.device)
        self.last_good_step = 0
        """The last step at which a check passed (0: before training)."""

    @torch.no_grad()
    def update(self, loss: Tensor | None, parameters: Iterable[Tensor] = ()) -> None:
        """And "``loss`` (if given) and every parameter are finite" into the device flag (no
        host sync)."""
        flags = [] if loss is None else [torch.isfinite(loss.detach()).all()]
        flags += [torch.isfinite(p.detach()).all() for p in parameters]
        if flags:  # one reduction per tensor; the stack stays on the device
            self._ok &= torch.stack(flags).all().to(self.device)

    def ok(self) -> bool:
        """Read the flag (agreed across ranks when ``all_reduce_min`` was given): one sync."""
        flag = self._ok.to(torch.int32)
        if self._reduce is not None:
            flag = self._reduce(flag)
        return bool(flag.item())

    def check(self, step: int, *, last_good: str | None = None) -> None:
        """Raise :class:`BundleflowError` if anything became non-finite since the last check.

        ``last_good`` names the last good checkpoint for the message (e.g. its path).
        """
        if self.ok():
            self.last_good_step = step
            return
        where = last_good or "none (no checkpoint was written yet)"
        raise BundleflowError(
            f"{self.stage}: loss or parameters became non-finite between step "
            f"{self.last_good_step} and step {step}; the last good checkpoint is {where}; "
            f"{self.fix}, then resume or restart"
        )

    def reset(self) -> None:
        """Mark the current state good (e.g. after restoring a checkpoint)."""
        self._ok.fill_(True)
