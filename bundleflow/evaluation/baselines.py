"""Mechanisms a learned menu is compared against (see the baselines spec).

Pure functions of valuation tensors in the user's units: XOR ``[N, K, m+1]`` (atoms T_k in
the first m columns, values b_k in the last) or additive ``[N, m]``. Every posted-price
baseline is scored with the same hard rule as a menu: the bidder takes the option of
highest utility, ties going to the lowest index, and buys iff that utility is ≥ 0.

With non-negative prices an XOR bidder's best purchase is one atom or nothing (buying more
than T_k never adds value), so posted prices reduce to a price per atom: item pricing
charges p·T_k, bundle-size pricing the cheapest size ≥ |T_k|.

This module is the public face: the outcomes, the grand bundle, :class:`FittedBaselines`
and :func:`fit_baselines`. The fits of the posted-price schedules live in
:mod:`bundleflow.evaluation.fit_prices` and are importable from here too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from bundleflow.evaluation.fit_prices import (
    _single_price,
    _size_options,
    atom_parts,
    distinct_rows,
    effective_size_prices,
    fit_bundle_size_prices,
    fit_item_prices,
    fit_price_schedules,
    fit_uniform_item_price,
)
from bundleflow.maths.revenue import hard_choice

__all__ = [
    "FittedBaselines",
    "atom_parts",
    "bundle_size_outcome",
    "distinct_rows",
    "effective_size_prices",
    "fit_baselines",
    "fit_bundle_size_prices",
    "fit_grand_bundle_price",
    "fit_item_prices",
    "fit_uniform_item_price",
    "grand_bundle_payments",
    "grand_bundle_values",
    "item_price_outcome",
    "posted_outcome",
    "upper_bound_values",
]


# --------------------------------------------------------------------------- shared rule


def posted_outcome(values: Tensor, prices: Tensor) -> tuple[Tensor, Tensor]:
    """The hard rule (:func:`bundleflow.maths.revenue.hard_choice`) over options: values and
    prices ``[..., N, K]`` (broadcast).

    Returns ``choice [..., N]`` (lowest index among the utility maxima,
    :data:`bundleflow.maths.revenue.WALK_AWAY` when the best utility is negative) and
    ``payment [..., N]``.
    """
    return hard_choice(values - prices, prices)  # (..., N, K) utilities


# ------------------------------------------------------------------ upper bound, grand bundle


def grand_bundle_values(valuations: Tensor) -> Tensor:
    """v(all items) per bidder: max_k b_k (XOR, free disposal) or Σ_i v_i (additive)."""
    if valuations.dim() == 3:
        return valuations[..., -1].amax(dim=1)
    return valuations.sum(dim=1)


def upper_bound_values(valuations: Tensor) -> Tensor:
    """Full surplus extraction per bidder ``[N]``: v(all items); its mean bounds any mechanism."""
    return grand_bundle_values(valuations)


def fit_grand_bundle_price(train: Tensor) -> float:
    """The revenue-maximising single price of the grand bundle on ``train``, in closed form."""
    return _single_price(grand_bundle_values(train))


def grand_bundle_payments(valuations: Tensor, price: float) -> Tensor:
    """Payments ``[N]``: the bidder buys the grand bundle iff its value ≥ price."""
    values = grand_bundle_values(valuations)
    return torch.where(values >= price, torch.full_like(values, price), torch.zeros_like(values))


# --------------------------------------------------------------------------- item pricing


def item_price_outcome(valuations: Tensor, prices: Tensor) -> tuple[Tensor, Tensor]:
    """Posted item prices ``[m]`` (≥ 0): ``choice [N]`` and ``payment [N]`` (float64).

    XOR: the bidder buys the atom k* = argmax_k (b_k − p·T_k) iff its utility is ≥ 0 and
    pays p·T_k* (``choice`` is the atom index). Additive: each item is bought iff v_i ≥ p_i
    (``choice`` counts the items bought).
    """
    p = prices.double().to(valuations.device)
    if valuations.dim() == 2:
        bought = valuations.double() >= p  # (N, m)
        return bought.sum(dim=1), (bought * p).sum(dim=1)
    atoms, values = atom_parts(valuations)
    cost = atoms @ p  # (N, K, m) @ (m,) -> (N, K)
    return posted_outcome(values, cost)


# --------------------------------------------------------------------------- bundle-size pricing


def bundle_size_outcome(valuations: Tensor, size_prices: Tensor) -> tuple[Tensor, Tensor]:
    """Prices per cardinality ``[m+1]`` (index 0 unused; ``inf`` = not for sale).

    XOR: the bidder buys atom k* = argmax_k (b_k − e_{|T_k|}) iff ≥ 0 and pays e_{|T_k*|}.
    Additive: options are the top-s item sets, s = 0..m (``choice`` is the size bought).
    """
    sizes, values = _size_options(valuations)
    eff = effective_size_prices(size_prices.double().to(values.device))
    return posted_outcome(values, eff[sizes])


# --------------------------------------------------------------------------- all together


@dataclass
class FittedBaselines:
    """Every baseline's parameters, fitted on one training split (user money units)."""

    grand_bundle_price: float
    uniform_price: float
    item_prices: Tensor
    size_prices: Tensor

    def payments(self, valuations: Tensor) -> dict[str, Tensor]:
        """Per-valuation payments ``[N]`` (float64) of every baseline, and the upper bound.

        Identical valuations are scored once (:func:`distinct_rows`): 100,000 specialists
        test valuations at m=100 are 101 distinct ones, and scoring each row took most of a
        suite run's evaluation on an H100 host (117 s of 270 s)."""
        found = distinct_rows(valuations) if valuations.dim() == 3 else None
        if found is not None:
            distinct, inverse = found
            return {name: pay[inverse] for name, pay in self._payments(distinct).items()}
        return self._payments(valuations)

    def _payments(self, valuations: Tensor) -> dict[str, Tensor]:
        m = self.item_prices.shape[0]
        uniform = torch.full((m,), self.uniform_price, dtype=torch.float64)
        return {
            "grand_bundle": grand_bundle_payments(valuations.double(), self.grand_bundle_price),
            "uniform_item_price": item_price_outcome(valuations, uniform)[1],
            "item_pricing": item_price_outcome(valuations, self.item_prices)[1],
            "bundle_size_pricing": bundle_size_outcome(valuations, self.size_prices)[1],
            "upper_bound": upper_bound_values(valuations).double(),
        }

    def params(self) -> dict:
        """JSON-ready parameters (``None`` for a size not for sale)."""
        return {
            "grand_bundle": {"price": self.grand_bundle_price},
            "uniform_item_price": {"price": self.uniform_price},
            "item_pricing": {"prices": self.item_prices.tolist()},
            "bundle_size_pricing": {
                "prices": [x if math.isfinite(x) else None for x in self.size_prices.tolist()][1:],
                "effective": [
                    x if math.isfinite(x) else None
                    for x in effective_size_prices(self.size_prices).tolist()
                ][1:],
            },
        }


def fit_baselines(train: Tensor) -> FittedBaselines:
    """Fit grand bundle, uniform item price, item pricing and bundle-size pricing on ``train``."""
    uniform, item_prices, size_prices = fit_price_schedules(train)
    return FittedBaselines(
        grand_bundle_price=fit_grand_bundle_price(train),
        uniform_price=uniform,
        item_prices=item_prices,
        size_prices=size_prices,
    )
