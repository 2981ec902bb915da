"""The posted-price baseline fits as they were before issue 27 (commit 6a6e4b7): the direct
evaluation of every candidate over every bidder and atom, the reference the fast fits in
:mod:`bundleflow.evaluation.baselines` must reproduce (tests and ``scripts/bench_baselines.py``).

One change: candidates whose revenues differ by less than ``REVENUE_TIE`` (relative) tie, as
in the fast fits. The strict comparison let float summation noise break ties that are exact
in real numbers (a size price one ulp under the next size's, where every candidate above it
sells at the same effective price, moved on a difference of 2e-12 of 722), so the old fits
themselves depended on the order of a sum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from bundleflow.maths.revenue import hard_choice
from bundleflow.valuations.xor import atoms_and_values

# Fitting knobs. Grids are multiplicative around the current price so that a fit is
# equivariant in the unit of money; the window halves every ascent round.
UNIFORM_CANDIDATES = 512
"""Quantiles of the per-atom value/size ratios tried as the uniform item price."""
GRID_POINTS = 33
"""Candidate prices per coordinate and round (odd: the current price is the middle one)."""
GRID_HALF_WIDTH = math.log(4.0)
"""First round's window: prices from current/4 to current×4 (log-spaced)."""
ASCENT_ROUNDS = 6
"""Coordinate-ascent rounds (each visits every item or size once)."""
CHUNK_ELEMENTS = 2**22
"""Bound on candidates × valuations × atoms materialised at once (memory)."""


# --------------------------------------------------------------------------- shared rule


def atom_parts(valuations: Tensor) -> tuple[Tensor, Tensor]:
    """Atoms ``[N, K, m]`` (float64 0/1) and values ``[N, K]`` (float64) of XOR valuations.

    An empty atom (a padding row) is no purchase: its value is −inf, so it is never chosen
    and a bidder whose real atoms all have negative utility walks away.
    """
    if valuations.dim() != 3:
        raise ValueError(f"XOR valuations must be [N, K, m+1], got {tuple(valuations.shape)}")
    return atoms_and_values(valuations, dtype=torch.float64, padding=-math.inf)


def posted_outcome(values: Tensor, prices: Tensor) -> tuple[Tensor, Tensor]:
    """The hard rule (:func:`bundleflow.maths.revenue.hard_choice`) over options: values and
    prices ``[..., N, K]`` (broadcast).

    Returns ``choice [..., N]`` (lowest index among the utility maxima,
    :data:`bundleflow.maths.revenue.WALK_AWAY` when the best utility is negative) and
    ``payment [..., N]``.
    """
    return hard_choice(values - prices, prices)  # (..., N, K) utilities


def _revenue_sum(values: Tensor, prices: Tensor) -> Tensor:
    """Σ payments over the valuation axis under :func:`posted_outcome`'s rule, for fitting.

    ``values [N, K]``, ``prices [G, N, K]`` -> ``[G]``. ``max`` returns the first maximum's
    index (documented), the same lowest-index tie rule without the explicit search.
    """
    best, first = (values - prices).max(dim=-1)  # (G, N)
    paid = prices.gather(-1, first.unsqueeze(-1)).squeeze(-1)
    return torch.where(best >= 0, paid, 0.0).sum(dim=-1)


REVENUE_TIE = 1e-9


def _best_candidate(revenue: Tensor, current: int | None = None) -> int:
    """Index of the highest revenue (the first, or ``current`` on a tie, within REVENUE_TIE)."""
    top = float(revenue.max())
    near = top - REVENUE_TIE * abs(top)
    if current is not None and float(revenue[current]) >= near:
        return current
    return int((revenue >= near).nonzero()[0])


def _grid(center: float, half_width: float) -> Tensor:
    """``GRID_POINTS`` log-spaced prices around ``center`` (the middle one is ``center``)."""
    steps = torch.linspace(-half_width, half_width, GRID_POINTS, dtype=torch.float64)
    grid = center * steps.exp()
    grid[GRID_POINTS // 2] = center
    return grid


def _chunks(n_candidates: int, per_candidate: int):
    size = max(1, CHUNK_ELEMENTS // max(1, per_candidate))
    for start in range(0, n_candidates, size):
        yield start, min(start + size, n_candidates)


# ------------------------------------------------------------------ upper bound, grand bundle


def grand_bundle_values(valuations: Tensor) -> Tensor:
    """v(all items) per bidder: max_k b_k (XOR, free disposal) or Σ_i v_i (additive)."""
    if valuations.dim() == 3:
        return valuations[..., -1].amax(dim=1)
    return valuations.sum(dim=1)


def upper_bound_values(valuations: Tensor) -> Tensor:
    """Full surplus extraction per bidder ``[N]``: v(all items); its mean bounds any mechanism."""
    return grand_bundle_values(valuations)


def _single_price(values: Tensor) -> float:
    """The revenue-maximising posted price for one good with buyer values ``values`` (any shape).

    Sort v_(1) ≥ … ≥ v_(N); P = v_(i) sells to at least i buyers, so P* = v_(i*) with
    i* = argmax_i i·v_(i) (ties: the higher price).
    """
    ordered = values.double().flatten().sort(descending=True).values
    if ordered.numel() == 0:
        raise ValueError("cannot fit a price on no valuations")
    counts = torch.arange(1, ordered.numel() + 1, dtype=torch.float64)
    return float(ordered[int(torch.argmax(counts * ordered))])  # first maximum: highest price


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


def fit_uniform_item_price(train: Tensor) -> float:
    """The best single price charged for every item (one parameter).

    Additive: the closed form on the pooled item values. XOR: the best of
    ``UNIFORM_CANDIDATES`` quantiles of b_k/|T_k|, then a local multiplicative refinement.
    """
    if train.dim() == 2:
        return _single_price(train)
    atoms, values = atom_parts(train)
    sizes = atoms.sum(dim=-1)  # (N, K)
    ratios = (values / sizes)[sizes > 0]
    if ratios.numel() == 0:
        raise ValueError("cannot fit a price on valuations without atoms")
    q = torch.linspace(0, 1, UNIFORM_CANDIDATES, dtype=torch.float64)
    candidates = torch.quantile(ratios, q).unique()
    revenue = _uniform_revenue(values, sizes, candidates)
    price = float(candidates[_best_candidate(revenue)])
    width = GRID_HALF_WIDTH / 8  # quantiles are dense: refine close by
    for _ in range(ASCENT_ROUNDS):
        grid = _grid(price, width)
        price = float(grid[_best_candidate(_uniform_revenue(values, sizes, grid), len(grid) // 2)])
        width /= 2
    return price


def _uniform_revenue(values: Tensor, sizes: Tensor, candidates: Tensor) -> Tensor:
    """Training revenue ``[G]`` of each uniform price in ``candidates [G]``."""
    out = []
    for a, b in _chunks(candidates.numel(), values.numel()):
        cost = candidates[a:b, None, None] * sizes  # (G_c, 1, 1) * (N, K) -> (G_c, N, K)
        out.append(_revenue_sum(values, cost))
    return torch.cat(out)


def fit_item_prices(
    train: Tensor, *, rounds: int = ASCENT_ROUNDS, start: float | None = None
) -> Tensor:
    """Per-item prices ``[m]`` (float64) that maximise training revenue.

    Additive: each item's closed-form posted price (items are sold independently). XOR:
    coordinate ascent from the best uniform price; each step tries a log-spaced grid for
    one item with the others fixed, only on the bidders with an atom holding that item, and
    keeps the current price unless a candidate is strictly better, so the training revenue
    never falls below the uniform price's.
    """
    if train.dim() == 2:
        return torch.tensor([_single_price(train[:, i]) for i in range(train.shape[1])])
    atoms, values = atom_parts(train)
    m = atoms.shape[-1]
    uniform = fit_uniform_item_price(train) if start is None else start
    prices = torch.full((m,), uniform, dtype=torch.float64)
    holds = atoms.amax(dim=1)  # (N, m): some atom of the bidder holds item i
    width = GRID_HALF_WIDTH
    for _ in range(rounds):
        for i in range(m):  # coordinate ascent: a loop over items, not valuations
            rows = holds[:, i].nonzero().squeeze(1)
            if rows.numel() == 0 or prices[i] <= 0:
                continue
            grid = _grid(float(prices[i]), width)
            revenue = _item_grid_revenue(atoms[rows], values[rows], prices, i, grid)
            prices[i] = grid[_best_candidate(revenue, len(grid) // 2)]
        width /= 2
    return prices


def _item_grid_revenue(
    atoms: Tensor, values: Tensor, prices: Tensor, item: int, grid: Tensor
) -> Tensor:
    """Training revenue ``[G]`` with item ``item`` priced at each of ``grid [G]``.

    Moving one item's price shifts every atom holding it by the same amount, so per bidder
    only two options compete: the best atom without the item (fixed utility a, index k0)
    and the best atom with it (utility c − g, index k1). That makes the grid ``[G, N]``
    instead of ``[G, N, K]``.
    """
    has = atoms[..., item] > 0  # (N, K)
    base = atoms @ prices - atoms[..., item] * prices[item]  # (N, K): cost with the item free
    free_u = values - base
    a, k0 = torch.where(has, -math.inf, free_u).max(dim=1)  # (N,): best atom without it
    c, k1 = torch.where(has, free_u, -math.inf).max(dim=1)  # (N,): best atom with it
    pay_a = base.gather(1, k0[:, None]).squeeze(1)
    pay_c = base.gather(1, k1[:, None]).squeeze(1)
    with_u = c - grid[:, None]  # (G, 1) -> (G, N)
    takes = (with_u > a) | ((with_u == a) & (k1 < k0))
    best = torch.where(takes, with_u, a)
    paid = torch.where(takes, pay_c + grid[:, None], pay_a)
    return torch.where(best >= 0, paid, 0.0).sum(dim=1)


# --------------------------------------------------------------------------- bundle-size pricing


def effective_size_prices(size_prices: Tensor) -> Tensor:
    """e_s = min_{s' ≥ s} q_{s'} for ``size_prices [..., m+1]`` (index s = cardinality).

    A bidder who needs s items may buy any bigger bundle; index 0 (buying nothing) is 0.
    """
    flipped = size_prices.flip(-1).cummin(dim=-1).values.flip(-1)
    flipped[..., 0] = 0.0
    return flipped


def _xor_sizes(valuations: Tensor) -> tuple[Tensor, Tensor]:
    atoms, values = atom_parts(valuations)
    return atoms.sum(dim=-1).round().long(), values  # (N, K) sizes, (N, K) values


def _additive_as_sizes(valuations: Tensor) -> tuple[Tensor, Tensor]:
    """An additive bidder's best bundle of each size s is its top-s items: options s=1..m
    (column s; column 0, buying nothing, is no option: walking away is the rule's)."""
    top = valuations.double().sort(dim=1, descending=True).values.cumsum(dim=1)  # (N, m)
    values = torch.cat([top.new_full((top.shape[0], 1), -math.inf), top], dim=1)  # (N, m+1)
    sizes = torch.arange(values.shape[1]).expand_as(values)
    return sizes, values


def _size_options(valuations: Tensor) -> tuple[Tensor, Tensor]:
    return _xor_sizes(valuations) if valuations.dim() == 3 else _additive_as_sizes(valuations)


def bundle_size_outcome(valuations: Tensor, size_prices: Tensor) -> tuple[Tensor, Tensor]:
    """Prices per cardinality ``[m+1]`` (index 0 unused; ``inf`` = not for sale).

    XOR: the bidder buys atom k* = argmax_k (b_k − e_{|T_k|}) iff ≥ 0 and pays e_{|T_k*|}.
    Additive: options are the top-s item sets, s = 0..m (``choice`` is the size bought).
    """
    sizes, values = _size_options(valuations)
    eff = effective_size_prices(size_prices.double().to(values.device))
    return posted_outcome(values, eff[sizes])


def fit_bundle_size_prices(train: Tensor, *, rounds: int = ASCENT_ROUNDS) -> Tensor:
    """Prices per cardinality ``[m+1]`` (float64; ``inf`` for sizes absent from ``train``).

    Start: for each size s, the closed-form posted price on the bidders' best size-s value
    (under CATS every atom of a bidder has one size, so this is the exact per-size optimum
    before the min-over-larger-sizes coupling). Then coordinate ascent over the sizes with
    log-spaced grids, scoring the true rule with effective prices.
    """
    sizes, values = _size_options(train)
    m = sizes.shape[-1] - 1 if train.dim() == 2 else train.shape[-1] - 1
    q = torch.full((m + 1,), math.inf, dtype=torch.float64)
    q[0] = 0.0
    for s in sizes.unique().tolist():
        if s == 0:
            continue
        best_s = torch.where(sizes == s, values, -math.inf).amax(dim=1)  # (N,)
        q[s] = _single_price(best_s[best_s > -math.inf])
    present = [s for s in range(1, m + 1) if math.isfinite(q[s])]
    width = GRID_HALF_WIDTH
    for _ in range(rounds):
        for s in present:  # a loop over sizes, not valuations
            rows = (sizes <= s).logical_and(sizes > 0).any(dim=1).nonzero().squeeze(1)
            if rows.numel() == 0 or q[s] <= 0:
                continue
            sub_sizes, sub_values = sizes[rows], values[rows]
            grid = _grid(float(q[s]), width)
            revenue = []
            for a, b in _chunks(grid.numel(), sub_values.numel()):
                trial = q.expand(b - a, m + 1).clone()
                trial[:, s] = grid[a:b]
                eff = effective_size_prices(trial)  # (G_c, m+1)
                cost = eff.index_select(1, sub_sizes.flatten()).view(b - a, *sub_sizes.shape)
                revenue.append(_revenue_sum(sub_values, cost))  # (G_c, N_s, K) -> (G_c,)
            q[s] = grid[_best_candidate(torch.cat(revenue), len(grid) // 2)]
        width /= 2
    return q


# --------------------------------------------------------------------------- all together


@dataclass
class FittedBaselines:
    """Every baseline's parameters, fitted on one training split (user money units)."""

    grand_bundle_price: float
    uniform_price: float
    item_prices: Tensor
    size_prices: Tensor

    def payments(self, valuations: Tensor) -> dict[str, Tensor]:
        """Per-valuation payments ``[N]`` (float64) of every baseline, and the upper bound."""
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
    uniform = fit_uniform_item_price(train)
    return FittedBaselines(
        grand_bundle_price=fit_grand_bundle_price(train),
        uniform_price=uniform,
        item_prices=fit_item_prices(train, start=uniform),
        size_prices=fit_bundle_size_prices(train),
    )
