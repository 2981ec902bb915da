"""The known-optimum settings' optimal mechanisms as explicit lottery menus, and what each
valuation pays under one (the hard rule with the seller-favouring tie-break).

The evaluation compares a trained menu's payments with these, valuation by valuation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from bundleflow.valuations.known_families import Catalogue, additive_xor
from bundleflow.valuations.known_optima import pavlov_optimum, single_price_unit_demand

TIE_TOL = 1e-6
"""Ties of :func:`menu_payments`, relative to max(1, the menu's largest price): utilities
within it count as equal (and as ≥ 0). Stored valuations are float32 (1.9 is stored
1.8999999762), so an exact comparison would send a bidder the optimum intends to sell to
away over a rounding of 2.4e-8."""


@dataclass(frozen=True)
class LotteryMenu:
    """An explicit menu of lotteries: option j gives bundle ``bundles[j, d]`` (``[J, D, m]``,
    0/1) with probability ``probs[j, d]`` (``[J, D]``; zero rows pad) at ``prices[j]``."""

    bundles: Tensor
    probs: Tensor
    prices: Tensor
    description: str = ""


def lottery_menu(options: Sequence, n_items: int, description: str = "") -> LotteryMenu:
    """``[([(prob, [items]), ...], price), ...]`` as a :class:`LotteryMenu`."""
    depth = max(len(lottery) for lottery, _ in options)
    bundles = torch.zeros(len(options), depth, n_items, dtype=torch.float64)
    probs = torch.zeros(len(options), depth, dtype=torch.float64)
    for j, (lottery, _) in enumerate(options):
        for d, (prob, items) in enumerate(lottery):
            bundles[j, d, list(items)] = 1.0
            probs[j, d] = float(prob)
    prices = torch.tensor([float(price) for _, price in options], dtype=torch.float64)
    return LotteryMenu(bundles, probs, prices, description)


def as_xor(valuations: Tensor) -> Tensor:
    """XOR ``[N, K, m+1]`` as given; additive values ``[N, m]`` (the ``additive`` data kind)
    as their 2^m − 1 XOR atoms."""
    return additive_xor(valuations) if valuations.dim() == 2 else valuations


def _singleton_values(part: Tensor, distinct: Tensor) -> Tensor:
    """XOR values ``[r, P]`` of bundles of at most one item (``distinct`` ``[P, m]``): v({i})
    is the best atom equal to {i} (or empty), v(∅) the best empty atom (zero rows: 0)."""
    m = distinct.shape[1]
    items = part[..., :m]
    size = items.sum(dim=-1)  # (r, K)
    value = part[..., m].float()  # (r, K)
    empty = torch.where(size == 0, value, 0.0).amax(dim=1).clamp(min=0)  # (r,)
    single = torch.where(size == 1, value, 0.0)  # (r, K)
    per_item = torch.zeros(part.shape[0], m, dtype=value.dtype)
    per_item.scatter_reduce_(1, items.argmax(dim=-1), single, reduce="amax")  # (r, m)
    column = distinct.argmax(dim=1)  # (P,)
    nonempty = distinct.sum(dim=1) == 1  # (P,)
    return torch.where(nonempty, per_item[:, column], 0.0).maximum(empty[:, None])


def menu_payments(valuations: Tensor, menu: LotteryMenu, *, chunk: int = 4_000_000) -> Tensor:
    """Per-valuation payments ``[N]`` (float64) under ``menu`` with the hard rule: the bidder
    takes an option of the highest utility (the lottery's expected XOR value minus its price)
    or walks away at 0. Ties are broken in the seller's favour — the IR/IC tie-break of the
    optimum: a bidder indifferent between buying and walking away buys, and among options of
    equal utility takes the dearest (within :data:`TIE_TOL`). ``chunk`` bounds the
    ``[rows, K, bundles]`` containment table."""
    vals = as_xor(valuations)
    n, k, width = vals.shape
    m = width - 1
    j, depth, _ = menu.bundles.shape
    flat = menu.bundles.reshape(j * depth, m)  # (J·D, m) support points
    distinct, where = torch.unique(flat, dim=0, return_inverse=True)  # (P, m), (J·D,)
    outside = (1.0 - distinct).T.float()  # (m, P); 0/1 counts are exact in float32
    prices = menu.prices.double()
    tol = TIE_TOL * max(1.0, float(prices.abs().max()))
    out = torch.empty(n, dtype=torch.float64)
    singletons = bool(distinct.sum(dim=1).max() <= 1)
    rows = max(1, chunk // max(1, k * (m if singletons else distinct.shape[0])))
    for start in range(0, n, rows):
        part = vals[start : start + rows]
        # (r, K, m) @ (m, P) -> (r, K, P): an atom fits a bundle iff none of its items is outside
        r = part.shape[0]
        if singletons:  # every support bundle has ≤ 1 item: no [r, K, P] table
            bundle_value = _singleton_values(part, distinct)
        else:
            fits = (part[..., :m].float().reshape(r * k, m) @ outside == 0).view(r, k, -1)
            atom_value = part[..., m:].float()  # (r, K, 1)
            bundle_value = torch.where(fits, atom_value, 0.0).amax(dim=1).clamp(min=0)  # (r, P)
        support = bundle_value.double()[:, where].view(r, j, depth)  # (r, J, D)
        value = (support * menu.probs).sum(dim=2)  # (r, J)
        utility = value - prices
        best = utility.amax(dim=1, keepdim=True)
        chosen = (utility >= best - tol) & (utility >= -tol)  # (r, J)
        pay = torch.where(chosen, prices, -math.inf).amax(dim=1)
        out[start : start + rows] = torch.where(chosen.any(dim=1), pay, 0.0)
    return out


def optimal_menu(setting: str, params: dict, catalogue: Catalogue | None = None):
    """The setting's optimal mechanism as an explicit :class:`LotteryMenu`, or None where none
    is known explicitly (additive U[0,1]^m for m ≥ 3: the optimum is published as a number).

    - specialists: a uniform lottery over items 1..⌈high⌉ at 1 (a specialist's value 1; a
      flexible bidder's ≤ high/⌈high⌉ ≤ 1), each item at ``high``: full surplus;
    - unit-demand U[c, c+1]² (scaled): the ½–½ lottery at q, either item at p (Pavlov);
      where the lottery is not bought (U[0,1]²): one price for either item;
    - additive-ddt: (item 1 w.p. ½, item 2) at 8, the bundle {1, 2} at 12;
    - additive-uniform m = 2: each item at 2/3, the bundle at (4 − √2)/3 (Manelli–Vincent);
    - catalogue: each catalogue bundle g at w_g/2.
    """
    if setting == "specialists":
        m, high = params["n_items"], float(params["high"])
        size = math.ceil(high)
        lottery = [(1 / size, [i]) for i in range(size)]
        options = [(lottery, 1.0), *[([(1.0, [i])], high) for i in range(m)]]
        return lottery_menu(options, m, f"lottery over {size} items at 1, each item at {high}")
    if setting == "unit-demand":
        low, high = float(params["low"]), float(params["high"])
        width, c = high - low, low / (high - low)
        _, p, q = pavlov_optimum(round(c, 12))
        if q < p:
            options = [([(1.0, [0])], width * p), ([(1.0, [1])], width * p),
                       ([(0.5, [0]), (0.5, [1])], width * q)]  # fmt: skip
            return lottery_menu(
                options, 2, f"½–½ lottery at {width * q:.6g}, items at {width * p:.6g}"
            )
        price = width * single_price_unit_demand(c)[1]
        return lottery_menu(
            [([(1.0, [0])], price), ([(1.0, [1])], price)], 2, f"one price {price:.6g}"
        )
    if setting == "additive-ddt":
        options = [([(0.5, [0, 1]), (0.5, [1])], 8.0), ([(1.0, [0, 1])], 12.0)]
        return lottery_menu(options, 2, "(item 1 w.p. ½, item 2) at 8, the bundle at 12")
    if setting == "additive-uniform":
        if params["n_items"] != 2:
            return None
        item, bundle = 2 / 3, (4 - math.sqrt(2)) / 3
        options = [([(1.0, [0])], item), ([(1.0, [1])], item), ([(1.0, [0, 1])], bundle)]
        return lottery_menu(options, 2, "each item at 2/3, the bundle at (4 − √2)/3")
    if setting == "catalogue":
        if catalogue is None:
            return None
        pairs = zip(catalogue.bundles, catalogue.weights, strict=True)
        options = [([(1.0, row.nonzero().squeeze(1).tolist())], float(w) / 2) for row, w in pairs]
        return lottery_menu(options, catalogue.bundles.shape[1], "each catalogue bundle at w_g/2")
    return None
