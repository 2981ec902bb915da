"""This process's part of the menu when several processes train it, and the whole-menu views
built from it: the λ reset statistic, the gathered menu, checkpoints that do not depend on
the number of processes. One process: the part is the whole menu and no collective runs."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from bundleflow.errors import BundleflowError
from bundleflow.maths.menu import Menu
from bundleflow.system.distributed import Comm
from bundleflow.train.checkpoint import load_optimizer_tensors, optimizer_tensors
from bundleflow.train.config import Config
from bundleflow.train.menu_init import menu_like
from bundleflow.train.stage2_step import Layout


@dataclass
class MenuShard:
    """``parallel``: ``single`` (one process), ``shard`` (this rank owns menu elements
    ``[lo, hi)`` of ``n_elements`` and the whole batch) or ``replicate`` (the whole menu and
    ``1/world`` of the batch; gradients averaged)."""

    menu: Menu
    n_elements: int
    parallel: str = "single"
    comm: Comm = field(default_factory=Comm)
    lo: int = 0

    @classmethod
    def split(cls, full: Menu, cfg: Config, comm: Comm) -> MenuShard:
        """This rank's part of the whole initial menu (the same on every rank: one seed)."""
        parallel = cfg.stage2.parallel if comm.active else "single"
        lo, menu = 0, full
        if parallel == "shard":
            lo, hi = comm.shard(cfg.menu.size)
            if hi == lo:
                raise BundleflowError(
                    f"config key 'menu.size': {cfg.menu.size} elements cannot be sharded over "
                    f"{comm.world} processes; use fewer processes or stage2.parallel=replicate"
                )
            menu = menu_like(full, {k: v[lo:hi] for k, v in full.state_dict().items()})
        elif parallel == "replicate" and cfg.stage2.batch_size % comm.world:
            raise BundleflowError(
                f"config key 'stage2.batch_size': {cfg.stage2.batch_size} is not divisible by "
                f"{comm.world} processes (stage2.parallel=replicate splits the batch)"
            )
        return cls(menu, cfg.menu.size, parallel, comm, lo)

    @property
    def hi(self) -> int:
        return self.lo + self.menu.menu_size

    def layout(self) -> Layout:
        """Where the step's part lives (:class:`bundleflow.train.stage2_step.Layout`)."""
        return Layout(self.parallel, self.comm, self.lo, self.n_elements)

    @torch.no_grad()
    def mean_support_location(self, mix_temp: float) -> float:
        """The λ reset statistic over all J elements."""
        if self.parallel != "shard":
            return self.menu.mean_support_location(mix_temp)
        per_point = self.menu.support_locations().mean(dim=-1)
        local = (self.menu.mixture_weights(mix_temp) * per_point).sum(dim=-1).sum()
        total = self.comm.all_reduce(local.double().reshape(1))
        return float(total) / self.n_elements

    @torch.no_grad()
    def full_menu(self) -> Menu:
        """All J elements (gathered from every rank under ``shard``; else the menu itself)."""
        if self.parallel != "shard":
            return self.menu
        J = self.n_elements
        state = {k: self.comm.all_gather_rows(v, J) for k, v in self.menu.state_dict().items()}
        return menu_like(self.menu, state)

    def full_state(self, optimizer: torch.optim.Optimizer) -> tuple[dict, dict, dict]:
        """(menu state, optimizer tensors, optimizer rest) for all J elements: checkpoints
        do not depend on the number of processes."""
        opt_tensors, opt_rest = optimizer_tensors(optimizer)
        menu_state = dict(self.menu.state_dict())
        if self.parallel == "shard":
            menu_state = dict(self.full_menu().state_dict())
            opt_tensors = {
                k: self.comm.all_gather_rows(v, self.n_elements) if v.dim() > 0 else v
                for k, v in opt_tensors.items()
            }
        return menu_state, opt_tensors, opt_rest

    def load_full_state(
        self, optimizer: torch.optim.Optimizer, menu_state: dict, opt_tensors: dict, opt_rest: dict
    ) -> None:
        """Restore this rank's rows of a whole-menu checkpoint."""
        device = self.menu.means.device
        rows = slice(self.lo, self.hi) if self.parallel == "shard" else slice(None)
        self.menu.load_state_dict({k: v[rows].to(device) for k, v in menu_state.items()})
        opt = {}
        for k, v in opt_tensors.items():
            if v.dim() > 0:
                v = v[rows]
            on_device = v.dim() > 0 or getattr(optimizer, "defaults", {}).get("fused")
            opt[k] = v.to(device) if on_device else v
        load_optimizer_tensors(optimizer, opt, opt_rest)
