"""A posted-price schedule offered beside the learned menu as one more option (the fallback).

The bidder may, instead of a menu element, buy any atom at posted prices: item pricing
charges c(T) = p·T, bundle-size pricing c(T) = e_|T| with effective size prices
e_s = min_{s' ≥ s} q_{s'}. The option's utility is u_fb(v) = max_k (b_k − c(T_k)) and its
payment c(T_k*) (first maximum). A menu plus a posted-price schedule is still a menu, so
the hard rule (argmax over [u_1 … u_J, u_fb], ties to the lowest index, the fallback last;
walk away when the best utility is negative) keeps DSIC and IR.

Pure tensors: prices in whatever money unit the valuations use (normalised in training,
the user's in a frozen mechanism). Every operation is vectorised over the batch and the
atoms and never synchronises with the host, so the option fits in a captured CUDA graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from bundleflow.valuations.xor import atoms_and_values

if TYPE_CHECKING:
    from bundleflow.evaluation.baselines import FittedBaselines

KINDS = ("item", "size")


@dataclass(frozen=True)
class PostedPrices:
    """Item prices ``[m]`` and/or effective size prices ``[m+1]`` (index s = cardinality,
    index 0 unused, ``inf`` = no bundle of that size or larger for sale).

    With both schedules the bidder may use either (ties go to item prices). Prices must be
    ≥ 0 (then an XOR bidder's best purchase is one atom) and effective size prices
    non-decreasing (see :func:`bundleflow.evaluation.baselines.effective_size_prices`).
    """

    item_prices: Tensor | None = None
    size_prices: Tensor | None = None

    def __post_init__(self) -> None:
        if self.item_prices is None and self.size_prices is None:
            raise ValueError("PostedPrices needs item_prices, size_prices or both")

    @property
    def kind(self) -> str:
        """``item``, ``size`` or ``item+size``."""
        present = (self.item_prices, self.size_prices)
        return "+".join(k for k, t in zip(KINDS, present, strict=True) if t is not None)

    def scaled(self, factor: float) -> PostedPrices:
        """Prices × ``factor`` (a change of money unit)."""
        return PostedPrices(
            item_prices=None if self.item_prices is None else self.item_prices * factor,
            size_prices=None if self.size_prices is None else self.size_prices * factor,
        )

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        """A copy on ``device`` in ``dtype``."""
        return PostedPrices(
            item_prices=None if self.item_prices is None else self.item_prices.to(device, dtype),
            size_prices=None if self.size_prices is None else self.size_prices.to(device, dtype),
        )

    # ------------------------------------------------------------------ the option

    def outcome(self, valuations: Tensor) -> tuple[Tensor, Tensor]:
        """The option's utility ``[B]`` and payment ``[B]`` for XOR ``[B, K, m+1]`` or
        additive ``[B, m]`` valuations, in their dtype (float32 for integer input).

        A bidder who can buy nothing under the schedule (no atom, or only sizes not for
        sale) gets utility −inf and payment 0: the option does not exist for it.
        """
        options = []
        if self.item_prices is not None:
            options.append(self._item(valuations))
        if self.size_prices is not None:
            options.append(self._size(valuations))
        utility, payment = options[0]
        for other_u, other_pay in options[1:]:  # both schedules: the better, items on ties
            better = other_u > utility
            utility = torch.where(better, other_u, utility)
            payment = torch.where(better, other_pay, payment)
        return utility, payment

    def _dtype(self, valuations: Tensor) -> torch.dtype:
        return valuations.dtype if valuations.is_floating_point() else torch.float32

    def _item(self, valuations: Tensor) -> tuple[Tensor, Tensor]:
        dtype = self._dtype(valuations)
        p = self.item_prices.to(valuations.device, dtype)
        if valuations.dim() == 2:  # additive: buy every item with v_i ≥ p_i
            v = valuations.to(dtype)
            bought = v >= p  # (B, m)
            utility = torch.where(bought, v - p, 0.0).sum(dim=1)
            payment = torch.where(bought, p, 0.0).sum(dim=1)
            none = ~bought.any(dim=1)
            return torch.where(none, -math.inf, utility), torch.where(none, 0.0, payment)
        atoms, values = atoms_and_values(valuations, dtype=dtype, padding=-math.inf)
        # An elementwise sum, not a matmul: exact and free of TF32 (B·K·m is small).
        cost = (atoms * p).sum(dim=-1)  # (B, K, m) * (m,) -> (B, K)
        return _best_atom(values, cost)

    def _size(self, valuations: Tensor) -> tuple[Tensor, Tensor]:
        dtype = self._dtype(valuations)
        eff = self.size_prices.to(valuations.device, dtype)  # (m+1,)
        if valuations.dim() == 2:  # additive: the best bundle of size s is the top s items
            top = valuations.to(dtype).sort(dim=1, descending=True).values.cumsum(dim=1)
            return _best_atom(top, eff[1:].expand_as(top))  # (B, m): options s = 1..m
        atoms, values = atoms_and_values(valuations, dtype=dtype, padding=-math.inf)
        sizes = atoms.sum(dim=-1).round().long()  # (B, K)
        return _best_atom(values, eff[sizes])

    def bundle_cost(self, bundles: Tensor) -> Tensor:
        """What the schedule charges for everything in each bundle ``[..., m]`` (0/1) -> ``[...]``.

        An upper bound on c(T) for every atom T ⊆ S: item pricing p·S; size pricing the
        effective price of |S|, or where that is not for sale the highest finite effective
        price at or below |S| (0 if none); with both schedules the cheaper. A lottery over
        bundles priced at its expected bundle cost is weakly worse than this option for
        every XOR bidder whose atoms the schedule sells.
        """
        bundles = bundles.to(self._cost_dtype())
        costs = []
        if self.item_prices is not None:
            costs.append((bundles * self.item_prices).sum(dim=-1))
        if self.size_prices is not None:
            eff = self.size_prices
            finite = torch.where(torch.isfinite(eff), eff, 0.0).cummax(dim=0).values
            costs.append(finite[bundles.sum(dim=-1).round().long()])
        return costs[0] if len(costs) == 1 else torch.minimum(costs[0], costs[1])

    def _cost_dtype(self) -> torch.dtype:
        t = self.item_prices if self.item_prices is not None else self.size_prices
        return t.dtype


def _best_atom(values: Tensor, cost: Tensor) -> tuple[Tensor, Tensor]:
    """max_k (values − cost) ``[B]`` and the cost of the first maximiser ``[B]`` (0 where the
    maximum is −inf: nothing to buy)."""
    utility = values - cost  # (B, K); −inf for padding or sizes not for sale
    best, first = utility.max(dim=-1)  # max returns the first maximum's index
    payment = cost.gather(-1, first.unsqueeze(-1)).squeeze(-1)
    available = best > -math.inf
    return best, torch.where(available, payment, 0.0)


# --------------------------------------------------------------------------- fitting

FALLBACK_KINDS = ("item", "size", "best")


def fit_posted_prices(
    train: Tensor, kind: str, prefitted: FittedBaselines | None = None
) -> tuple[PostedPrices, dict]:
    """Fit the fallback on ``train`` (user units; XOR ``[N, K, m+1]`` or additive ``[N, m]``).

    ``kind``: ``item`` (item pricing), ``size`` (bundle-size pricing) or ``best`` (whichever
    has the higher training revenue; item pricing on ties). Returns float64 prices in the
    units of ``train`` and a record ``{"kind", "train_revenue": {name: revenue}}``.
    ``prefitted``: the baselines already fitted on ``train``, whose prices are reused.
    """
    from bundleflow.evaluation import baselines  # the fits live with the baselines they are

    if kind not in FALLBACK_KINDS:
        raise ValueError(f"kind must be one of {FALLBACK_KINDS}, got {kind!r}")
    fitted: dict[str, PostedPrices] = {}
    revenue: dict[str, float] = {}
    reuse = prefitted is not None
    if kind in ("item", "best"):
        prices = prefitted.item_prices if reuse else baselines.fit_item_prices(train)
        fitted["item"] = PostedPrices(item_prices=prices)
        revenue["item"] = float(baselines.item_price_outcome(train, prices)[1].mean())
    if kind in ("size", "best"):
        q = prefitted.size_prices if reuse else baselines.fit_bundle_size_prices(train)
        fitted["size"] = PostedPrices(size_prices=baselines.effective_size_prices(q))
        revenue["size"] = float(baselines.bundle_size_outcome(train, q)[1].mean())
    chosen = max(revenue, key=lambda name: revenue[name])  # dict order: item first on ties
    return fitted[chosen], {"kind": chosen, "train_revenue": revenue}
