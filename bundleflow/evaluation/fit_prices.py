"""Fitting the posted-price baselines on a training split: the closed-form single price, the
uniform item price, item-price and bundle-size-price coordinate ascent
(:mod:`bundleflow.evaluation.baselines` is the public face: outcomes, ``fit_baselines``).

Valuations as in :mod:`bundleflow.evaluation.baselines`: XOR ``[N, K, m+1]`` or additive
``[N, m]``, scored with the same hard rule as a menu. Fitting works in float64 on the
training split and is vectorised over valuations; the loops run over items, sizes, grid
chunks and ascent rounds only. Every grid is relative to a fitted price, so the fitted
prices scale with the unit of money.

Fitting is fast at any number of atoms (issue 27): identical valuations are scored once with
their count as a weight; a bidder's atoms of one size collapse to the best one (same choice,
same payment); and a coordinate step, where every bidder weighs one option whose price is
the candidate against one whose price is not, scores all candidates from per-bidder
thresholds with one weighted histogram instead of a [candidates, bidders, atoms] tensor.
Results equal the direct evaluation (``tests/baselines_reference.py``) up to the order of
float sums.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

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
REVENUE_TIE = 1e-9
"""Relative revenue difference below which two candidates tie (float summation order)."""
CROSSING_MARGIN = 1e-9
"""Relative distance from a candidate price within which a bidder's choice is computed by
the direct rule (float rounding, ~1e-16, or an exact tie could decide it)."""


# ----------------------------------------------------------- atoms and sizes


def atom_parts(valuations: Tensor) -> tuple[Tensor, Tensor]:
    """Atoms ``[N, K, m]`` (float64 0/1) and values ``[N, K]`` (float64) of XOR valuations.

    An empty atom (a padding row) is no purchase: its value is −inf, so it is never chosen
    and a bidder whose real atoms all have negative utility walks away.
    """
    if valuations.dim() != 3:
        raise ValueError(f"XOR valuations must be [N, K, m+1], got {tuple(valuations.shape)}")
    return atoms_and_values(valuations, dtype=torch.float64, padding=-math.inf)


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


def _single_price(values: Tensor, weights: Tensor | None = None) -> float:
    """The revenue-maximising posted price for one good with buyer values ``values`` (any shape).

    Sort v_(1) ≥ … ≥ v_(N); P = v_(i) sells to at least i buyers, so P* = v_(i*) with
    i* = argmax_i i·v_(i) (ties: the higher price). ``weights``: how many buyers each value
    stands for (default 1); i then counts them.
    """
    flat = values.double().flatten()
    if flat.numel() == 0:
        raise ValueError("cannot fit a price on no valuations")
    ordered, order = flat.sort(descending=True, stable=True)
    counts = (
        torch.arange(1, flat.numel() + 1, dtype=torch.float64)
        if weights is None
        else weights.double().flatten()[order].cumsum(0)
    )
    return float(ordered[int(torch.argmax(counts * ordered))])  # first maximum: highest price


def _best_candidate(revenue: Tensor, current: int | None = None) -> int:
    """Index of the highest revenue: the first one, or ``current`` (the price now) on a tie,
    so ascent never goes down. Revenues within ``REVENUE_TIE`` of the best are a tie: the
    fast scoring sums the same payments in another order than the direct one."""
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


# --------------------------------------------------------------------------- fast scoring

_NO_ATOM = 2**62
"""Atom index of a missing option: above every real index, so it never wins a tie."""


def distinct_rows(valuations: Tensor) -> tuple[Tensor, Tensor] | None:
    """Distinct valuations ``[U, ...]`` and each row's position among them ``[N]``, or
    None when every row is distinct or a grouping could not be confirmed.

    Identical bidders choose identically, so a fit or a score computes each distinct one
    once (specialists: 40,000 valuations are 101 distinct ones). Rows are grouped by a
    random projection, then compared exactly; if a group holds rows that differ (a
    collision), None: every row is kept.
    """
    n = valuations.shape[0]
    flat = valuations.reshape(n, -1)
    probe = torch.randn(flat.shape[1], generator=torch.Generator().manual_seed(0))
    key = flat @ probe.to(device=flat.device, dtype=flat.dtype)  # (N, D) @ (D,) -> (N,)
    order = key.argsort(stable=True)
    starts = torch.ones(n, dtype=torch.bool, device=flat.device)
    starts[1:] = key[order[1:]] != key[order[:-1]]
    if bool(starts.all()):
        return None
    group = starts.cumsum(0) - 1  # (N,): group of each row in key order
    first = order[starts]  # (U,): one row of each group
    rep = first[group]
    step = max(1, CHUNK_ELEMENTS // max(1, flat.shape[1]))
    for a in range(0, n, step):
        if not torch.equal(flat[order[a : a + step]], flat[rep[a : a + step]]):
            return None
    inverse = torch.empty_like(group)
    inverse[order] = group
    return valuations[first], inverse


def _distinct(valuations: Tensor) -> tuple[Tensor, Tensor]:
    """Distinct valuations ``[U, ...]`` and how often each occurs ``[U]`` (float64); every
    row with weight 1 where :func:`distinct_rows` finds none to merge."""
    found = distinct_rows(valuations)
    if found is None:
        return valuations, torch.ones(valuations.shape[0], dtype=torch.float64)
    distinct, inverse = found
    return distinct, torch.bincount(inverse, minlength=distinct.shape[0]).double()


def _size_table(sizes: Tensor, values: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Each bidder's best option of each size present (sizes ``[N, K]``, values ``[N, K]``).

    Returns values ``[N, S]`` (−inf where the bidder has none of that size), atom indices
    ``[N, S]`` (the lowest among equal values; :data:`_NO_ATOM` where none) and sizes
    ``[S]``. Options of one size cost the same at any posted price, so the rule (highest
    utility, lowest index) only ever takes these: scoring the table is scoring the atoms.
    """
    k = torch.arange(sizes.shape[1])
    present = [s for s in sizes.unique().tolist() if s > 0]
    best, index = [], []
    for s in present:
        mine = sizes == s
        v = torch.where(mine, values, -math.inf)
        top = v.amax(dim=1)  # (N,)
        best.append(top)
        index.append(torch.where(mine & (v == top[:, None]), k, _NO_ATOM).amin(dim=1))
    if not present:
        raise ValueError("cannot fit a price on valuations without atoms")
    return torch.stack(best, 1), torch.stack(index, 1), torch.tensor(present)


def _first_best(utility: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
    """Best utility ``[...]`` over the last axis and the position of the maximum whose atom
    index (``index``, broadcast) is lowest: the hard rule's choice."""
    best = utility.amax(dim=-1)
    key = torch.where(utility == best.unsqueeze(-1), index, _NO_ATOM)
    return best, key.argmin(dim=-1)


def _takes(u: Tensor, a: Tensor, k0: Tensor, k1: Tensor) -> Tensor:
    """The hard rule between two options: utility ``u`` (index k1) is bought over ``a``
    (index k0) iff u ≥ 0 and it beats a, ties going to the lower index."""
    return (u >= 0) & ((u > a) | ((u == a) & (k1 < k0)))


def _two_option_revenue(
    fixed: tuple[Tensor, Tensor, Tensor],
    varying: tuple[Tensor, Tensor, Tensor],
    grid: Tensor,
    weights: Tensor,
) -> Tensor:
    """Training revenue ``[G]`` of every candidate price ``grid [G]`` (ascending) when each
    bidder ``[N]`` weighs its best option whose price does not move against its best one
    whose price is the candidate plus a base.

    ``fixed = (a, k0, pay_a)``: utility, atom index, payment; ``varying = (c, k1, base)``:
    utility before the candidate, index, payment before it. The varying option is bought at
    g iff ``_takes(c − g, a, k0, k1)``, which only turns false as g grows, so it is bought
    at a prefix of the grid. Its length comes from the threshold c − max(a, 0), confirmed
    with the exact rule on both sides (a float tie is counted candidate by candidate), and
    suffix sums of one weighted histogram of lengths give every candidate's revenue.
    """
    a, k0, pay_a = fixed
    c, k1, base = varying
    n_grid = grid.numel()
    length = torch.searchsorted(grid, (c - a.clamp(min=0)).contiguous())  # (N,) grid < t
    below = grid[(length - 1).clamp(min=0)]
    above = grid[length.clamp(max=n_grid - 1)]
    exact = ((length == 0) | _takes(c - below, a, k0, k1)) & (
        (length == n_grid) | ~_takes(c - above, a, k0, k1)
    )
    tie = (~exact).nonzero().squeeze(1)
    if tie.numel():
        u = c[tie] - grid[:, None]  # (G, 1) -> (G, N_tie)
        length[tie] = _takes(u, a[tie], k0[tie], k1[tie]).sum(dim=0)
    bins = n_grid + 1
    base = torch.where(length > 0, base, 0.0)
    count = torch.bincount(length, weights=weights, minlength=bins)
    base_sum = torch.bincount(length, weights=weights * base, minlength=bins)
    paid_out = torch.where(a >= 0, pay_a, 0.0)  # the fixed option, or nothing
    out_sum = torch.bincount(length, weights=weights * paid_out, minlength=bins)
    # candidate j: bidders with length > j buy the varying option, the others the fixed one
    taken = count.flip(0).cumsum(0).flip(0)[1:]
    taken_base = base_sum.flip(0).cumsum(0).flip(0)[1:]
    return taken_base + grid * taken + out_sum.cumsum(0)[:-1]


# -------------------------------------------------- uniform and item pricing


def fit_uniform_item_price(train: Tensor) -> float:
    """The best single price charged for every item (one parameter).

    Additive: the closed form on the pooled item values. XOR: the best of
    ``UNIFORM_CANDIDATES`` quantiles of b_k/|T_k|, then a local multiplicative refinement.
    """
    if train.dim() == 2:
        return _single_price(train)
    distinct, weights = _distinct(train)
    return _uniform_price(train, _size_table(*_xor_sizes(distinct)), weights)


def _uniform_price(train: Tensor, table: tuple[Tensor, Tensor, Tensor], weights: Tensor) -> float:
    sizes = train[..., :-1].sum(dim=-1, dtype=torch.float64)  # (N, K)
    ratios = (train[..., -1].double() / sizes)[sizes > 0]
    if ratios.numel() == 0:
        raise ValueError("cannot fit a price on valuations without atoms")
    q = torch.linspace(0, 1, UNIFORM_CANDIDATES, dtype=torch.float64)
    candidates = torch.quantile(ratios, q).unique()
    revenue = _uniform_revenue(table, weights, candidates)
    price = float(candidates[_best_candidate(revenue)])
    width = GRID_HALF_WIDTH / 8  # quantiles are dense: refine close by
    for _ in range(ASCENT_ROUNDS):
        grid = _grid(price, width)
        revenue = _uniform_revenue(table, weights, grid)
        price = float(grid[_best_candidate(revenue, len(grid) // 2)])
        width /= 2
    return price


def _uniform_revenue(
    table: tuple[Tensor, Tensor, Tensor], weights: Tensor, candidates: Tensor
) -> Tensor:
    """Training revenue ``[G]`` of each uniform price in ``candidates [G]`` (ascending; a
    size table ``[N, S]``).

    In real numbers a bidder takes size t on one run of candidates: where t beats every
    smaller size (P < (b_t − b_t')/(t − t')), every larger one, and walking away (P ≤ b_t/t).
    Those runs, from ``searchsorted``, give the items sold at every candidate through one
    difference array. A bidder with a crossing within ``CROSSING_MARGIN`` of a candidate,
    where float rounding or a tie could decide, is scored by the direct rule instead.
    """
    values, index, sizes = table
    n_grid, n_sizes = candidates.numel(), sizes.numel()
    size = sizes.double()
    lo = torch.zeros(values.shape, dtype=torch.long)  # (N, S): first candidate taking t
    hi = torch.full(values.shape, n_grid, dtype=torch.long)  # (N, S): one past the last
    near = torch.zeros(values.shape[0], dtype=torch.bool)

    def runs(crossing: Tensor, scale: Tensor, right: bool) -> Tensor:
        count = torch.searchsorted(candidates, crossing.contiguous(), right=right)
        for j in (count - 1, count):  # the candidates on either side of the crossing
            gap = (candidates[j.clamp(0, n_grid - 1)] - crossing).abs()
            near.logical_or_(gap <= CROSSING_MARGIN * scale)
        return count

    for t in range(n_sizes):
        b = values[:, t]
        scale = torch.where(b.isfinite(), b.abs(), 0.0)
        hi[:, t] = runs(b / size[t], scale, right=True)  # P ≤ b_t/t: buying t is IR
        for s in range(t):  # t is larger than s: t beats s below the crossing
            x = (b - values[:, s]) / (size[t] - size[s])
            x = torch.where(b > -math.inf, x, -math.inf)  # a missing size never wins
            gap_scale = scale + values[:, s].abs() + x.abs() * (size[t] + size[s])
            count = runs(x, torch.where(x.isfinite(), gap_scale, 0.0), right=False)
            hi[:, t] = torch.minimum(hi[:, t], count)
            lo[:, s] = torch.maximum(lo[:, s], count)
    missing = values == -math.inf
    hi = torch.where(missing, 0, hi)
    near.logical_or_(values.isnan().any(dim=1))
    sold = (weights[:, None] * size).expand_as(values)  # (N, S): items sold while in a run
    keep = (hi > lo) & ~near[:, None]
    steps = torch.zeros(n_grid + 1, dtype=torch.float64)
    steps.index_add_(0, lo[keep], sold[keep]).index_add_(0, hi[keep], -sold[keep])
    revenue = candidates * steps.cumsum(0)[:-1]
    rows = near.nonzero().squeeze(1)
    if rows.numel():
        revenue += _uniform_revenue_direct(
            values[rows], index[rows], size, weights[rows], candidates
        )
    return revenue


def _uniform_revenue_direct(
    values: Tensor, index: Tensor, size: Tensor, weights: Tensor, candidates: Tensor
) -> Tensor:
    """The rule applied to every candidate, bidder ``[N]`` and size ``[S]``."""
    out = []
    for a, b in _chunks(candidates.numel(), values.numel()):
        cost = candidates[a:b, None, None] * size  # (G_c, 1, 1) * (S,) -> (G_c, 1, S)
        best, pos = _first_best(values - cost, index)  # (G_c, N, S) -> (G_c, N)
        paid = candidates[a:b, None] * size[pos]
        out.append((torch.where(best >= 0, paid, 0.0) * weights).sum(dim=-1))
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
    distinct, weights = _distinct(train)
    if start is None:
        start = _uniform_price(train, _size_table(*_xor_sizes(distinct)), weights)
    return _item_ascent(distinct, weights, start, rounds)


def _item_ascent(distinct: Tensor, weights: Tensor, start: float, rounds: int) -> Tensor:
    """Coordinate ascent over item prices on distinct valuations ``[U, K, m+1]``.

    Moving one item's price shifts every atom holding it by the same amount, so per bidder
    only two options compete: the best atom without the item and the best atom with it
    (:func:`_two_option_revenue`). Atom costs p·T_k are kept and re-summed only for the
    atoms holding the item whose price moved.
    """
    atoms, values = atom_parts(distinct)
    m = atoms.shape[-1]
    prices = torch.full((m,), start, dtype=torch.float64)
    costs = _AtomCosts(atoms)
    cost = costs.of(torch.arange(values.numel()), prices).view_as(values)  # (U, K)
    holds = atoms.amax(dim=1) > 0  # (U, m): some atom of the bidder holds item i
    width = GRID_HALF_WIDTH
    for _ in range(rounds):
        for i in range(m):  # coordinate ascent: a loop over items, not valuations
            rows = holds[:, i].nonzero().squeeze(1)
            if rows.numel() == 0 or prices[i] <= 0:
                continue
            every = rows.numel() == values.shape[0]  # no gathers when every bidder holds it
            has = (atoms[:, :, i] if every else atoms[rows, :, i]) > 0  # (N_i, K)
            base = (cost if every else cost[rows]) - has * prices[i]  # cost with the item free
            free_u = (values if every else values[rows]) - base
            a, k0 = torch.where(has, -math.inf, free_u).max(dim=1)  # best atom without it
            c, k1 = torch.where(has, free_u, -math.inf).max(dim=1)  # best atom with it
            pay_a = base.gather(1, k0[:, None]).squeeze(1)
            pay_c = base.gather(1, k1[:, None]).squeeze(1)
            grid = _grid(float(prices[i]), width)
            revenue = _two_option_revenue((a, k0, pay_a), (c, k1, pay_c), grid, weights[rows])
            price = grid[_best_candidate(revenue, len(grid) // 2)]
            if price != prices[i]:
                prices[i] = price
                costs.refresh(cost.view(-1), i, prices)
        width /= 2
    return prices


class _AtomCosts:
    """p·T_k for chosen atoms of ``atoms [U, K, m]``, summed over each atom's items only."""

    def __init__(self, atoms: Tensor):
        flat = atoms.reshape(-1, atoms.shape[-1]) > 0  # (U·K, m)
        atom_of, self.item_of = flat.nonzero(as_tuple=True)  # by atom, then item
        self.ptr = torch.zeros(flat.shape[0] + 1, dtype=torch.long)
        self.ptr[1:] = torch.bincount(atom_of, minlength=flat.shape[0]).cumsum(0)
        by_item = torch.argsort(self.item_of, stable=True)
        sizes = torch.bincount(self.item_of, minlength=flat.shape[1]).tolist()
        self._holding = atom_of[by_item].split(sizes)
        self._plans: dict[int, tuple[Tensor, Tensor, Tensor]] = {}

    def _entries(self, atoms: Tensor) -> tuple[Tensor, Tensor]:
        """For flat atom indices ``atoms [A]``: each of their items' owner (position in
        ``atoms``) and item index, both ``[Σ |T_a|]``."""
        first, n_items = self.ptr[atoms], self.ptr[atoms + 1] - self.ptr[atoms]
        owner = torch.repeat_interleave(torch.arange(atoms.numel()), n_items)
        offset = torch.arange(owner.numel()) - (n_items.cumsum(0) - n_items)[owner]
        return owner, self.item_of[first[owner] + offset]

    def of(self, atoms: Tensor, prices: Tensor) -> Tensor:
        """Costs ``[A]`` of the flat atom indices ``atoms [A]`` at ``prices [m]``."""
        owner, items = self._entries(atoms)
        return torch.zeros(atoms.numel(), dtype=torch.float64).index_add_(0, owner, prices[items])

    def refresh(self, cost: Tensor, item: int, prices: Tensor) -> None:
        """Re-sum in ``cost [U·K]`` the atoms that hold ``item`` (their entries are kept:
        every ascent round visits the item again)."""
        if item not in self._plans:
            moved = self._holding[item]
            self._plans[item] = (moved, *self._entries(moved))
        moved, owner, items = self._plans[item]
        fresh = torch.zeros(moved.numel(), dtype=torch.float64)
        cost[moved] = fresh.index_add_(0, owner, prices[items])


# ------------------------------------------------------- bundle-size pricing


def fit_bundle_size_prices(train: Tensor, *, rounds: int = ASCENT_ROUNDS) -> Tensor:
    """Prices per cardinality ``[m+1]`` (float64; ``inf`` for sizes absent from ``train``).

    Start: for each size s, the closed-form posted price on the bidders' best size-s value
    (under CATS every atom of a bidder has one size, so this is the exact per-size optimum
    before the min-over-larger-sizes coupling). Then coordinate ascent over the sizes with
    log-spaced grids, scoring the true rule with effective prices.
    """
    distinct, weights = _distinct(train)
    return _size_ascent(distinct, weights, rounds)


def _size_ascent(
    distinct: Tensor, weights: Tensor, rounds: int, table: tuple[Tensor, ...] | None = None
) -> Tensor:
    """Bundle-size price ascent on distinct valuations (``table``: their size table, if
    already built)."""
    m = distinct.shape[-1] if distinct.dim() == 2 else distinct.shape[-1] - 1
    table = table or _size_table(*_size_options(distinct))
    best, index, present = table  # (U, S), (U, S), (S,)
    q = torch.full((m + 1,), math.inf, dtype=torch.float64)
    q[0] = 0.0
    for j, s in enumerate(present.tolist()):
        sold = best[:, j] > -math.inf
        q[s] = _single_price(best[sold, j], weights[sold])
    width = GRID_HALF_WIDTH
    for _ in range(rounds):
        for s in present.tolist():  # a loop over sizes, not valuations
            rows = (best[:, present <= s] > -math.inf).any(dim=1).nonzero().squeeze(1)
            if rows.numel() == 0 or q[s] <= 0:
                continue
            grid = _grid(float(q[s]), width)
            others = q.clone()
            others[s] = math.inf
            floor = effective_size_prices(others)[present]  # (S,): each size's price without q_s
            # a size t ≤ s costs min(floor_t, g): g where floor_t > g ("capped"), else floor_t;
            # the capped set only shrinks as g grows, so candidates fall into a few runs
            capped = (present <= s) & (floor > grid[:, None])  # (G, S)
            revenue = grid.new_empty(grid.shape)
            run = 0
            for j in range(1, len(grid) + 1):
                if j == len(grid) or not torch.equal(capped[j], capped[run]):
                    revenue[run:j] = _size_run_revenue(
                        best[rows], index[rows], floor, capped[run], grid[run:j], weights[rows]
                    )
                    run = j
            q[s] = grid[_best_candidate(revenue, len(grid) // 2)]
        width /= 2
    return q


def _size_run_revenue(
    best: Tensor, index: Tensor, floor: Tensor, capped: Tensor, grid: Tensor, weights: Tensor
) -> Tensor:
    """Revenue ``[G]`` of candidates ``grid`` for one size price when the sizes ``capped
    [S]`` cost the candidate and the others their ``floor [S]`` (a size table's rows)."""
    fixed_u = torch.where(capped, -math.inf, best - floor)  # (N, S)
    a, pos0 = _first_best(fixed_u, index)
    c, pos1 = _first_best(torch.where(capped, best, -math.inf), index)
    k0 = index.gather(1, pos0[:, None]).squeeze(1)
    k1 = index.gather(1, pos1[:, None]).squeeze(1)
    return _two_option_revenue((a, k0, floor[pos0]), (c, k1, torch.zeros_like(c)), grid, weights)


# ----------------------------------------------------- all schedules at once


def fit_price_schedules(train: Tensor) -> tuple[float, Tensor, Tensor]:
    """The uniform item price, item prices ``[m]`` and bundle-size prices ``[m+1]`` fitted on
    ``train``, sharing one pass over its distinct valuations and one size table."""
    distinct, weights = _distinct(train)
    table = _size_table(*_size_options(distinct))  # one per split: uniform and size pricing
    if train.dim() == 2:
        uniform = _single_price(train)
        item_prices = torch.tensor([_single_price(train[:, i]) for i in range(train.shape[1])])
    else:
        uniform = _uniform_price(train, table, weights)
        item_prices = _item_ascent(distinct, weights, uniform, ASCENT_ROUNDS)
    return uniform, item_prices, _size_ascent(distinct, weights, ASCENT_ROUNDS, table)
