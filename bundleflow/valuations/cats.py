"""CATS ``arbitrary`` and ``regions`` XOR valuations, one bidder per sample.

Follows ``shared/spec/cats.md`` (CATS 2.2: regions.cpp, arbitrary.cpp), step by step:

1. private values p_x (``upv``: U[−dev·M, dev·M]; ``npv``: N(mean, stdev)) and weights
   pn_x ∝ p_x + dev·M (upv) or p_x − min p (npv);
2. a first good drawn with probability pn_x;
3. while U ≤ additional_location: add a good — with probability jump_prob (regions only) a
   uniformly random good not in B, else good i ∉ B with probability ∝ pn_i · Σ_{j∈B} w(j, i)
   (w = grid adjacency for regions, d_ji for arbitrary); no candidate: nothing is added;
4. v(B) = Σ_{x∈B}(c_x + p_x) + |B|^(1+α), the size term *added*; v ≤ 0: redraw the bidder;
5. substitutes: from each x ∈ B grow a candidate to |B| goods with rule 3 (an add that finds
   no candidate drops the candidate); keep valid (0 ≤ v ≤ budget·v(B), Σc ≥ resale·Σ_B c,
   ≠ B), pairwise distinct candidates, most valuable first, at most max_substitutable_bids.

The output of one bidder is the XOR valuation ``[1 + max_substitutable_bids, m + 1]``:
B first, then the substitutes in descending value, zero rows as padding.

Everything here is plain Python on the ``random.Random`` it is given; a data set of n
bidders, one RNG per sample and in worker processes: :mod:`~bundleflow.valuations.cats_generate`.
"""

from __future__ import annotations

import math
import random
from bisect import bisect_right
from dataclasses import asdict, dataclass, fields
from itertools import accumulate
from operator import add, mul

from bundleflow.errors import BundleflowError

DISTRIBUTIONS = ("arbitrary", "regions")
PRIVATE_VALUES = ("upv", "npv")
MODES = ("fresh", "fixed")

# Bump whenever a change alters the generated numbers for the same settings and seed: the
# version is part of every data set's metadata and of the cache key.
ALGORITHM_VERSION = 1

# Safety nets that CATS does not have (it would loop forever instead).
MAX_MAP_ATTEMPTS = 10_000  # regions: passes over the grid until every cell has a neighbour
MAX_RESTARTS = 10_000  # draws of a bidder until v(B) > 0


@dataclass(frozen=True)
class CatsParams:
    """Every CATS 2.2 parameter of arbitrary/regions, with the CATS defaults."""

    max_good_value: float = 100.0
    """Common values c_x ~ U[1, max_good_value]; UPV private values scale with it."""
    deviation: float = 0.5
    """UPV private values p_x ~ U[−deviation·max_good_value, +deviation·max_good_value]."""
    normal_mean: float = 0.0
    """NPV private values p_x ~ N(normal_mean, normal_stdev)."""
    normal_stdev: float = 30.0
    """Standard deviation of NPV private values."""
    additional_location: float = 0.9
    """Probability of trying to add one more good to a bundle (must be < 1)."""
    additivity: float = 0.2
    """α in the size term |B|^(1+α) that is added to a bundle's value."""
    budget_factor: float = 1.5
    """A substitute's value must be ≤ budget_factor · v(B)."""
    resale_factor: float = 0.5
    """A substitute's common value must be ≥ resale_factor · Σ_{x∈B} c_x."""
    max_substitutable_bids: int = 5
    """At most this many substitutes: K = 1 + max_substitutable_bids atoms per sample."""
    remove_neighbor: float = 0.1
    """Regions: each right/down grid edge is dropped with this probability."""
    additional_neighbor: float = 0.2
    """Regions: per cell, probability of adding one diagonal edge."""
    jump_prob: float = 0.05
    """Regions: probability that an add picks a uniformly random good. Arbitrary never jumps
    (CATS forces 0 there whatever the setting)."""

    def __post_init__(self) -> None:
        def check(name: str, ok: bool, rule: str) -> None:
            if not ok:
                flag = "--" + name.replace("_", "-")
                raise BundleflowError(
                    f"CATS parameter {name}={getattr(self, name)!r} is invalid: {rule} "
                    f"(set it with {flag})"
                )

        for f in fields(self):
            value = getattr(self, f.name)
            check(
                f.name,
                isinstance(value, int | float)
                and not isinstance(value, bool)
                and math.isfinite(value),
                "it must be a finite number",
            )
        check("max_good_value", self.max_good_value >= 1, "it must be ≥ 1")
        check("deviation", self.deviation >= 0, "it must be ≥ 0")
        check("normal_stdev", self.normal_stdev >= 0, "it must be ≥ 0")
        check(
            "additional_location",
            0 <= self.additional_location < 1,
            "it must be in [0, 1); at 1 a bundle would grow forever",
        )
        check("budget_factor", self.budget_factor >= 0, "it must be ≥ 0")
        check("resale_factor", self.resale_factor >= 0, "it must be ≥ 0")
        check(
            "max_substitutable_bids",
            isinstance(self.max_substitutable_bids, int) and self.max_substitutable_bids >= 0,
            "it must be a whole number ≥ 0",
        )
        for name in ("remove_neighbor", "additional_neighbor", "jump_prob"):
            check(name, 0 <= getattr(self, name) <= 1, "it must be a probability in [0, 1]")

    @property
    def n_atoms(self) -> int:
        """K, the atoms per valuation in the output: 1 + max_substitutable_bids."""
        return 1 + self.max_substitutable_bids

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> CatsParams:
        """Strict: an unknown key is an error, not silently ignored."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise BundleflowError(f"unknown CATS parameter(s) {unknown}; known: {sorted(known)}")
        return cls(**data)


@dataclass(frozen=True, eq=False)
class ItemStructure:
    """The goods of one auction: common values and the graph that bundles grow along.

    ``neighbors`` (regions) holds each good's adjacency list on the grid; ``proximity``
    (arbitrary) the symmetric weights d_ij ∈ (0, 1), d_ii = 0.
    """

    dist: str
    common: tuple[float, ...]
    neighbors: tuple[tuple[int, ...], ...] | None = None
    proximity: tuple[tuple[float, ...], ...] | None = None

    @property
    def n_items(self) -> int:
        return len(self.common)

    @property
    def grid_side(self) -> int:
        """r = floor(√m): goods 0..r²−1 are the cells of an r×r grid (row-major)."""
        return math.isqrt(self.n_items)


@dataclass(frozen=True)
class Bidder:
    """One sampled bidder, with how its bundles were built (for tests and inspection).

    ``atoms[0]`` is B, the rest the kept substitutes (descending value). Items of each atom
    are in the order they were added; ``how[k][t]`` says how item t of atom k got there:
    ``"first"``, ``"edge"`` (grown along the graph) or ``"jump"``.
    """

    private: tuple[float, ...]
    atoms: tuple[tuple[int, ...], ...]
    values: tuple[float, ...]
    how: tuple[tuple[str, ...], ...]
    candidates: int
    """Substitute candidates tried (one per good of B)."""
    dropped: int
    """Candidates dropped because an add found nothing to add before reaching |B| goods."""
    restarts: int
    """Times the bidder was redrawn because v(B) ≤ 0."""


def check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    """``value`` is one of ``allowed``, else a user error naming the ``--name`` flag."""
    if value not in allowed:
        raise BundleflowError(
            f"unknown {name} {value!r}; choose one of {', '.join(allowed)} (--{name})"
        )


def check_items(dist: str, n_items: int) -> None:
    """m is a whole number ≥ 1 (≥ 4 for regions: a 2×2 grid), else a user error."""
    if not isinstance(n_items, int) or n_items < 1:
        raise BundleflowError(f"--items must be a whole number ≥ 1, got {n_items!r}")
    if dist == "regions" and n_items < 4:
        raise BundleflowError(
            f"regions needs at least 4 goods (a 2×2 grid), got --items {n_items}; "
            "use --items 4 or more, or --dist arbitrary"
        )


def regions_structure(n_items: int, params: CatsParams, rng: random.Random) -> ItemStructure:
    """The regions map: an r×r grid (r = ⌊√m⌋) with dropped edges and diagonals, then c_x.

    Each cell (i, j) gets its down edge and its right edge with probability
    1 − remove_neighbor, and with probability additional_neighbor one diagonal,
    (i,j)–(i+1,j+1) or (i+1,j)–(i,j+1), ½ each. If a cell ends without a neighbour the whole
    pass is repeated, adding edges on top of the existing ones (as CATS does). Goods beyond
    r² have no neighbours. The common values c_x ~ U[1, max_good_value] are drawn after.
    """
    check_items("regions", n_items)
    side = math.isqrt(n_items)
    adjacent: list[set[int]] = [set() for _ in range(n_items)]
    rand = rng.random

    def connect(i: int, j: int, x: int, y: int) -> None:
        if 0 <= i < side and 0 <= j < side and 0 <= x < side and 0 <= y < side:
            a, b = i * side + j, x * side + y
            adjacent[a].add(b)
            adjacent[b].add(a)

    for _ in range(MAX_MAP_ATTEMPTS):
        for i in range(side):
            for j in range(side):
                if rand() > params.remove_neighbor:
                    connect(i, j, i + 1, j)
                if rand() > params.remove_neighbor:
                    connect(i, j, i, j + 1)
                if rand() < params.additional_neighbor:
                    if rng.randrange(2) == 0:
                        connect(i, j, i + 1, j + 1)
                    else:
                        connect(i + 1, j, i, j + 1)
        if all(adjacent[cell] for cell in range(side * side)):
            break
    else:
        raise BundleflowError(
            f"regions: after {MAX_MAP_ATTEMPTS} passes some grid cell still has no neighbour "
            f"(remove_neighbor={params.remove_neighbor}, "
            f"additional_neighbor={params.additional_neighbor}); lower --remove-neighbor"
        )
    common = _common_values(n_items, params, rng)
    neighbors = tuple(tuple(sorted(a)) for a in adjacent)
    return ItemStructure("regions", common, neighbors=neighbors)


def arbitrary_structure(n_items: int, params: CatsParams, rng: random.Random) -> ItemStructure:
    """The arbitrary map: symmetric d_ij ~ U(0, 1) (a 0 is redrawn), d_ii = 0; then c_x."""
    check_items("arbitrary", n_items)
    rand = rng.random
    rows = [[0.0] * n_items for _ in range(n_items)]
    for i in range(n_items):
        row_i = rows[i]
        for j in range(i + 1, n_items):
            d = rand()
            while d == 0.0:
                d = rand()
            row_i[j] = d
            rows[j][i] = d
    common = _common_values(n_items, params, rng)
    return ItemStructure("arbitrary", common, proximity=tuple(tuple(r) for r in rows))


def make_structure(
    dist: str, n_items: int, params: CatsParams, rng: random.Random
) -> ItemStructure:
    check_choice("dist", dist, DISTRIBUTIONS)
    if dist == "regions":
        return regions_structure(n_items, params, rng)
    return arbitrary_structure(n_items, params, rng)


def _common_values(n_items: int, params: CatsParams, rng: random.Random) -> tuple[float, ...]:
    span = params.max_good_value - 1
    return tuple(rng.random() * span + 1 for _ in range(n_items))


def draw_private_values(
    n_items: int, params: CatsParams, private_values: str, rng: random.Random
) -> tuple[list[float], list[float]]:
    """p_x and the normalised weights pn_x (uniform if all weights are 0, e.g. deviation 0)."""
    if private_values == "upv":
        half = params.deviation * params.max_good_value
        private = [rng.random() * 2 * half - half for _ in range(n_items)]
        weight = [p + half for p in private]
    else:
        mean, stdev = params.normal_mean, params.normal_stdev
        private = [rng.gauss(mean, stdev) for _ in range(n_items)]
        low = min(private)
        weight = [p - low for p in private]
    total = sum(weight)
    if total <= 0:
        return private, [1.0 / n_items] * n_items
    return private, [w / total for w in weight]


class _Grower:
    """Step 3's add rule for one bidder on one structure.

    A growing bundle is (items, in_bundle, score) with score[i] = pn_i · Σ_{j∈B} w(j, i)
    for i ∉ B and 0 for i ∈ B, kept up to date per add so a draw costs O(m).
    """

    __slots__ = ("n_items", "weight", "jump", "rng", "neighbors", "proximity", "_rows")

    def __init__(
        self, structure: ItemStructure, weight: list[float], jump: float, rng: random.Random
    ) -> None:
        self.n_items = structure.n_items
        self.weight = weight
        self.jump = jump
        self.rng = rng
        self.neighbors = structure.neighbors
        self.proximity = structure.proximity
        self._rows: dict[int, list[float]] = {}

    def _row(self, good: int) -> list[float]:
        # arbitrary: [d_{good,i} · pn_i]_i, built once per good per bidder
        row = self._rows.get(good)
        if row is None:
            row = self._rows[good] = list(map(mul, self.proximity[good], self.weight))
        return row

    def start(self, good: int) -> tuple[list[int], bytearray, list[float]]:
        in_bundle = bytearray(self.n_items)
        in_bundle[good] = 1
        if self.neighbors is not None:
            score = [0.0] * self.n_items
            weight = self.weight
            for n in self.neighbors[good]:
                score[n] += weight[n]
        else:
            score = list(self._row(good))
        score[good] = 0.0
        return [good], in_bundle, score

    def add(self, items: list[int], in_bundle: bytearray, score: list[float]) -> str | None:
        """Try to add one good; returns ``"jump"``/``"edge"``, or None if nothing was added."""
        m = self.n_items
        if len(items) >= m:
            return None
        rng = self.rng
        if self.jump and rng.random() < self.jump:
            good = rng.randrange(m)
            while in_bundle[good]:
                good = rng.randrange(m)
            how = "jump"
        else:
            cumulative = list(accumulate(score))
            total = cumulative[-1]
            if total <= 0.0:
                return None
            good = bisect_right(cumulative, rng.random() * total)
            if good >= m:  # u·total rounded up to total: take the last good with weight
                good = max(i for i in range(m) if score[i] > 0.0)
            how = "edge"
        items.append(good)
        in_bundle[good] = 1
        if self.neighbors is not None:
            weight = self.weight
            for n in self.neighbors[good]:
                if not in_bundle[n]:
                    score[n] += weight[n]
            score[good] = 0.0
        else:
            score[:] = map(add, score, self._row(good))
            for b in items:
                score[b] = 0.0
        return how


def _draw_first(weight: list[float], rng: random.Random) -> int:
    cumulative = list(accumulate(weight))
    good = bisect_right(cumulative, rng.random() * cumulative[-1])
    if good >= len(weight):
        good = max(i for i, w in enumerate(weight) if w > 0.0)
    return good


def _grow_candidate(grower: _Grower, start: int, size: int) -> tuple[list[int], list[str]] | None:
    items, in_bundle, score = grower.start(start)
    how = ["first"]
    while len(items) < size:
        step = grower.add(items, in_bundle, score)
        if step is None:  # nothing to add: drop the candidate rather than loop on it
            return None
        how.append(step)
    return items, how


def grow_candidate(
    structure: ItemStructure,
    weights: list[float],
    start: int,
    size: int,
    *,
    jump_prob: float,
    rng: random.Random,
) -> tuple[list[int], list[str]] | None:
    """Step 5's substitute candidate: grow {start} to ``size`` goods with step 3's rule.

    ``weights`` are the bidder's normalised pn_x. Returns the goods in the order they were
    added and how each got there, or None when an add found no good to add (the candidate
    is dropped; CATS would loop until a jump).
    """
    grower = _Grower(structure, weights, jump_prob if structure.dist == "regions" else 0.0, rng)
    return _grow_candidate(grower, start, size)


def sample_bidder(
    structure: ItemStructure,
    params: CatsParams,
    private_values: str,
    rng: random.Random,
) -> Bidder:
    """One CATS bidder on ``structure`` (steps 1–5 of the spec)."""
    check_choice("values", private_values, PRIVATE_VALUES)
    first = _first_bundle(structure, params, private_values, rng)
    valid, dropped = _substitute_candidates(first, structure.common, params)
    atoms, values, hows = [tuple(first.items)], [first.value], [tuple(first.how)]
    seen = set()
    for value, cand, cand_how in valid:
        if len(atoms) > params.max_substitutable_bids:
            break
        key = frozenset(cand)
        if key in seen:
            continue
        seen.add(key)
        atoms.append(tuple(cand))
        values.append(value)
        hows.append(tuple(cand_how))
    return Bidder(
        private=tuple(first.private),
        atoms=tuple(atoms),
        values=tuple(values),
        how=tuple(hows),
        candidates=len(first.items),
        dropped=dropped,
        restarts=first.restarts,
    )


@dataclass(frozen=True, eq=False)
class _FirstBundle:
    """Steps 1–4 for one bidder: its private values p_x, c_x + p_x per good, its bundle B
    (goods in the order added, and how each was added), v(B), the grower the substitutes
    grow with (its weights pn_x and the bidder's RNG) and the redraws it took."""

    private: list[float]
    value_of: list[float]
    items: list[int]
    how: list[str]
    value: float
    grower: _Grower
    restarts: int


def _first_bundle(
    structure: ItemStructure, params: CatsParams, private_values: str, rng: random.Random
) -> _FirstBundle:
    """Draw private values and grow B until v(B) > 0 (CATS redraws the bidder otherwise)."""
    m = structure.n_items
    jump = params.jump_prob if structure.dist == "regions" else 0.0
    exponent = 1.0 + params.additivity
    for restarts in range(MAX_RESTARTS):
        private, weight = draw_private_values(m, params, private_values, rng)
        grower = _Grower(structure, weight, jump, rng)
        items, in_bundle, score = grower.start(_draw_first(weight, rng))
        how = ["first"]
        while len(items) < m and rng.random() <= params.additional_location:
            step = grower.add(items, in_bundle, score)
            if step is not None:
                how.append(step)
        value_of = [c + p for c, p in zip(structure.common, private, strict=True)]
        # summed in sorted order so identical sets get bit-identical values
        bundle_value = sum(value_of[i] for i in sorted(items)) + len(items) ** exponent
        if bundle_value > 0:
            return _FirstBundle(private, value_of, items, how, bundle_value, grower, restarts)
    raise BundleflowError(
        f"CATS: no bundle with a positive value after {MAX_RESTARTS} draws; the private "
        "values are too negative (check --normal-mean / --deviation / --max-good-value)"
    )


def _substitute_candidates(
    first: _FirstBundle, common: tuple[float, ...], params: CatsParams
) -> tuple[list[tuple[float, list[int], list[str]]], int]:
    """Step 5's valid candidates (value, goods, how), most valuable first, and the number
    dropped because an add found nothing to add."""
    items, value_of = first.items, first.value_of
    size = len(items)
    exponent = 1.0 + params.additivity
    bundle = frozenset(items)
    budget = params.budget_factor * first.value
    min_resale = params.resale_factor * sum(common[i] for i in sorted(items))
    valid: list[tuple[float, list[int], list[str]]] = []
    dropped = 0
    for start in items:
        grown = _grow_candidate(first.grower, start, size)
        if grown is None:
            dropped += 1
            continue
        cand, cand_how = grown
        ordered = sorted(cand)
        value = sum(value_of[i] for i in ordered) + size**exponent
        resale = sum(common[i] for i in ordered)
        if 0 <= value <= budget and resale >= min_resale and frozenset(cand) != bundle:
            valid.append((value, cand, cand_how))
    valid.sort(key=lambda v: -v[0])  # stable: equal values keep their generation order
    return valid, dropped
