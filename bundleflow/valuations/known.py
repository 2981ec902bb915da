"""Settings with known optimal revenue (single bidder): the known-optimum suite.

Each generator returns XOR valuations ``[N, K, m+1]`` (0/1 item columns, value last; zero
rows pad) drawn from a ``torch.Generator``; :func:`known_optimum` gives the setting's exact
optimal revenue (or the closed-form bound it is scored against) with its best deterministic
and best posted-price revenue where known. Facts and sources: ``spec/optima.md``; every
number is checked in ``tests/test_known_optima.py`` by an exact computation
(:func:`menu_revenue_2d`: areas of polygons in a uniform box) or a grid search.

Settings (name: parameters):

- ``specialists`` (m, ``high``): w.p. ½ every singleton is worth 1 (K = m atoms), else one
  uniform item is worth ``high``. Optimum = full surplus ½·1 + ½·high (a lottery over ≥ 2
  items at 1, each item at ``high``); loss-leader item pricing ½ + ½(1/m + high(m−1)/m);
  bundle-size pricing 1.
- ``unit-demand`` (``low``, ``high``): values U[low, high]² on singletons {1}, {2}.
  Optimum over Pavlov's (2011) menus for U[c, c+1]² (scaled): a ½–½ lottery at q and either
  item at p, optimised numerically with exact revenue; U[0,1]²: one price 1/√3, 0.3849;
  U[2,3]²: ≈ 2.1331.
- ``additive-ddt``: additive U[4,16] × U[4,7] as atoms {1}, {2}, {1,2}
  (Daskalakis–Deckelbaum–Tzamos 2017): optimum 88/9, best deterministic 9.6995.
- ``additive-uniform`` (m ≤ 6): additive U[0,1]^m as 2^m − 1 atoms; the optimum is a
  bundle-size schedule (Giannakopoulos–Koutsoupias 2018): a null control.
- ``catalogue`` (m, ``catalogue_size`` K, ``synergy_max``, ``catalogue_seed``): a public
  catalogue of K bundles of 3–5 items, none inside another; item values U[1,2] and a
  log-uniform synergy on [1, synergy_max] per bundle, drawn once from ``catalogue_seed``;
  w_g = Σ item values × synergy. A bidder wants one uniform catalogue bundle g with value
  U[0, w_g]: optimum mean(w_g)/4 (each bundle at w_g/2).

Imports torch only (and the standard library).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction

import torch
from torch import Tensor

SETTINGS = ("specialists", "unit-demand", "additive-ddt", "additive-uniform", "catalogue")
"""The known-optimum settings, by name."""

ADDITIVE_UNIFORM_OPTIMA = {1: 0.25, 2: 0.549, 3: 0.875, 4: 1.219, 5: 1.576, 6: 1.943}
"""Optimal revenue of additive U[0,1]^m (m = 1: Myerson price ½; m = 2: Manelli–Vincent,
exactly 0.54907 by :func:`manelli_vincent_m2`; m = 3..6: Giannakopoulos–Koutsoupias 2018,
three decimals as published). The optimum is a bundle-size schedule for every m ≤ 6."""

DDT_BOX = ((4, 16), (4, 7))
"""Supports of the two additive items of ``additive-ddt``."""

CATALOGUE_SIZES = (3, 5)
"""Smallest and largest catalogue bundle (items)."""


@dataclass(frozen=True)
class KnownOptimum:
    """A setting's optimal revenue and its reference points (user units)."""

    setting: str
    parameters: dict
    optimum: float
    optimum_kind: str
    """``exact`` (closed form), ``numerical`` (exact revenue, optimised over a proven-optimal
    family) or ``published`` (rounded as published)."""
    mechanism: str
    """The optimal mechanism in words."""
    best_deterministic: float | None = None
    best_posted_price: float | None = None
    posted_price: str = ""
    """Which posted price ``best_posted_price`` is."""
    source: str = ""
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- generators


def _padded(n: int, n_atoms: int, n_items: int, dtype=torch.float32) -> Tensor:
    return torch.zeros(n, n_atoms, n_items + 1, dtype=dtype)


def specialists(
    n: int, generator: torch.Generator, *, n_items: int = 20, high: float = 1.9
) -> Tensor:
    """``[n, m, m+1]``: w.p. ½ every singleton worth 1 (m atoms), else one uniform item worth
    ``high`` (one atom, the rest zero rows)."""
    if n_items < 2 or not 1 < high <= n_items:  # full surplus: a lottery over ⌈high⌉ items
        raise ValueError(f"specialists needs m ≥ 2 and 1 < high ≤ m, got m={n_items}, high={high}")
    out = _padded(n, n_items, n_items)
    flexible = torch.rand(n, generator=generator) < 0.5  # (n,)
    item = torch.randint(n_items, (n,), generator=generator)  # (n,)
    eye = torch.eye(n_items)
    out[:, :, :n_items] = eye  # every singleton, value 1
    out[:, :, n_items] = 1.0
    flex = flexible.nonzero().squeeze(1)
    out[flex] = 0.0
    out[flex, 0, item[flex]] = 1.0
    out[flex, 0, n_items] = high
    return out


def unit_demand(
    n: int, generator: torch.Generator, *, low: float = 2.0, high: float = 3.0
) -> Tensor:
    """``[n, 2, 3]``: atoms {1}, {2} with values i.i.d. U[low, high]."""
    if not 0 <= low < high:
        raise ValueError(f"unit-demand needs 0 ≤ low < high, got {low}, {high}")
    values = low + (high - low) * torch.rand(n, 2, generator=generator, dtype=torch.float64)
    out = _padded(n, 2, 2)
    out[:, 0, 0] = 1.0
    out[:, 1, 1] = 1.0
    out[:, :, 2] = values.float()
    return out


def _additive_xor(values: Tensor) -> Tensor:
    """Additive values ``[n, m]`` as XOR atoms ``[n, 2^m − 1, m+1]``, every non-empty set."""
    n, m = values.shape
    codes = torch.arange(1, 2**m)
    sets = ((codes[:, None] >> torch.arange(m)) & 1).to(values.dtype)  # (A, m)
    out = torch.empty(n, sets.shape[0], m + 1, dtype=torch.float32)
    out[:, :, :m] = sets
    out[:, :, m] = (values.double() @ sets.double().T).float()  # (n, m) @ (m, A) -> (n, A)
    return out


def additive_ddt(n: int, generator: torch.Generator) -> Tensor:
    """``[n, 3, 3]``: additive v1 ~ U[4,16], v2 ~ U[4,7] as atoms {1}, {2}, {1,2}."""
    (a1, b1), (a2, b2) = DDT_BOX
    u = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    values = torch.stack([a1 + (b1 - a1) * u[:, 0], a2 + (b2 - a2) * u[:, 1]], dim=1)
    return _additive_xor(values)


def additive_uniform(n: int, generator: torch.Generator, *, n_items: int = 2) -> Tensor:
    """``[n, 2^m − 1, m+1]``: additive U[0,1]^m as XOR atoms (m ≤ 6 has a known optimum)."""
    if not 1 <= n_items <= 10:
        raise ValueError(f"additive-uniform as XOR needs 1 ≤ m ≤ 10, got {n_items}")
    return _additive_xor(torch.rand(n, n_items, generator=generator, dtype=torch.float64))


@dataclass(frozen=True)
class Catalogue:
    """A public catalogue: ``bundles`` ``[K, m]`` (0/1), bundle values ``weights`` w_g ``[K]``
    (float64), and what they were drawn from."""

    bundles: Tensor
    weights: Tensor
    item_values: Tensor
    synergy: Tensor


def draw_catalogue(
    n_items: int, size: int, synergy_max: float, generator: torch.Generator
) -> Catalogue:
    """K distinct bundles of 3–5 items (uniform size, uniform items), none inside another
    (rejection), item values U[1,2], synergies log-uniform on [1, synergy_max]."""
    lo, hi = CATALOGUE_SIZES
    if n_items < hi + 1 or size < 1 or not synergy_max >= 1:
        raise ValueError(
            f"catalogue needs m > {hi}, K ≥ 1, synergy_max ≥ 1; got {n_items}, {size}, "
            f"{synergy_max}"
        )
    item_values = 1.0 + torch.rand(n_items, generator=generator, dtype=torch.float64)
    chosen: list[frozenset[int]] = []
    tries = 0
    while len(chosen) < size:
        tries += 1
        if tries > 10_000 * size:
            raise ValueError(f"could not draw {size} bundles none inside another from {n_items}")
        k = int(torch.randint(lo, hi + 1, (1,), generator=generator))
        items = frozenset(torch.randperm(n_items, generator=generator)[:k].tolist())
        if any(items <= g or g <= items for g in chosen):
            continue
        chosen.append(items)
    bundles = torch.zeros(size, n_items)
    for g, items in enumerate(chosen):
        bundles[g, sorted(items)] = 1.0
    synergy = torch.exp(
        math.log(synergy_max) * torch.rand(size, generator=generator, dtype=torch.float64)
    )
    weights = (bundles.double() @ item_values) * synergy  # (K, m) @ (m,) -> (K,)
    return Catalogue(bundles=bundles, weights=weights, item_values=item_values, synergy=synergy)


def catalogue_valuations(catalogue: Catalogue, n: int, generator: torch.Generator) -> Tensor:
    """``[n, 1, m+1]``: one uniform catalogue bundle g per bidder, value U[0, w_g]."""
    size, m = catalogue.bundles.shape
    g = torch.randint(size, (n,), generator=generator)
    value = torch.rand(n, generator=generator, dtype=torch.float64) * catalogue.weights[g]
    out = _padded(n, 1, m)
    out[:, 0, :m] = catalogue.bundles[g]
    out[:, 0, m] = value.float()
    return out


# --------------------------------------------------------------------------- exact revenue


Option = tuple[Sequence, object]
"""A menu option on two items: (the bidder's utility as (a1, a2, c) — u = a1 v1 + a2 v2 + c
before the price — and the price)."""


def _clip(poly: list, a1, a2, c) -> list:
    """The part of the convex polygon ``poly`` where a1 x + a2 y + c ≥ 0 (Sutherland–Hodgman)."""
    out = []
    for i, p in enumerate(poly):
        q = poly[(i + 1) % len(poly)]
        fp = a1 * p[0] + a2 * p[1] + c
        fq = a1 * q[0] + a2 * q[1] + c
        if fp >= 0:
            out.append(p)
        if (fp >= 0) != (fq >= 0) and fp != fq:
            t = fp / (fp - fq)
            out.append((p[0] + t * (q[0] - p[0]), p[1] + t * (q[1] - p[1])))
    return out


def _area(poly: list):
    if len(poly) < 3:
        return 0
    s = 0
    for i, p in enumerate(poly):
        q = poly[(i + 1) % len(poly)]
        s += p[0] * q[1] - q[0] * p[1]
    return abs(s) / 2


def menu_revenue_2d(box: Sequence, options: Sequence[Option]):
    """Exact expected revenue of a menu for two values uniform on the box
    ``((lo1, hi1), (lo2, hi2))``: each option's price times the area of the region where it
    is the bidder's best choice with utility ≥ 0, over the box's area (ties have measure
    zero). Each option: ``((a1, a2, c), price)``, utility a1 v1 + a2 v2 + c − price. Exact
    in :class:`fractions.Fraction` when given Fractions."""
    (x0, x1), (y0, y1) = box
    square = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    total = 0
    for k, ((a1, a2, c), price) in enumerate(options):
        region = _clip(square, a1, a2, c - price)
        for j, ((b1, b2, d), other) in enumerate(options):
            if j != k and region:
                region = _clip(region, a1 - b1, a2 - b2, (c - price) - (d - other))
        total += price * _area(region)
    return total / ((x1 - x0) * (y1 - y0))


def pavlov_menu(p: float, q: float) -> list[Option]:
    """Unit demand on two items: either item at ``p``, the ½–½ lottery at ``q``."""
    return [((1, 0, 0), p), ((0, 1, 0), p), ((0.5, 0.5, 0), q)]


def _grid_max(f: Callable, center: tuple, half: float, steps: int) -> tuple[float, tuple]:
    best = (-math.inf, center)
    for i in range(-steps, steps + 1):
        for j in range(-steps, steps + 1):
            x = (center[0] + half * i / steps, center[1] + half * j / steps)
            value = f(*x)
            if value > best[0]:
                best = (value, x)
    return best


@functools.lru_cache(maxsize=32)
def pavlov_optimum(c: float) -> tuple[float, float, float]:
    """(revenue, p, q): the best menu of Pavlov's form for U[c, c+1]², optimised by a
    coarse-to-fine grid on exact revenues (the optimum for these distributions, Pavlov 2011;
    with q ≥ p the lottery is never bought and the menu is one posted price)."""
    box = ((c, c + 1), (c, c + 1))

    def revenue(p, q):
        return menu_revenue_2d(box, pavlov_menu(p, q))

    value, x = _grid_max(revenue, (c + 0.5, c + 0.5), 0.5, 20)
    for half in (0.05, 0.005, 0.0005, 0.00005):
        value, x = _grid_max(revenue, x, half, 10)
    return value, x[0], x[1]


def single_price_unit_demand(c: float) -> tuple[float, float]:
    """(revenue, price) of the best single price for unit demand U[c, c+1]²: maximise
    p(1 − (p − c)²) over p ∈ [c, c+1] (closed form: the root of 3p² − 4cp + c² − 1 = 0)."""
    p = (2 * c + math.sqrt(c * c + 3)) / 3
    p = min(max(p, c), c + 1)
    return p * (1 - (p - c) ** 2), p


def manelli_vincent_m2() -> float:
    """Additive U[0,1]²: items at 2/3, the bundle at (4 − √2)/3 — exact revenue."""
    item, bundle = 2 / 3, (4 - math.sqrt(2)) / 3
    menu = [((1, 0, 0), item), ((0, 1, 0), item), ((1, 1, 0), bundle)]
    return menu_revenue_2d(((0, 1), (0, 1)), menu)


DDT_MENU = [((Fraction(1, 2), 1, 0), Fraction(8)), ((1, 1, 0), Fraction(12))]
"""Daskalakis–Deckelbaum–Tzamos's optimal menu for U[4,16] × U[4,7]: (item 1 w.p. ½,
item 2) at 8, the bundle at 12."""


DDT_BEST_DETERMINISTIC = 9.69826
"""The best deterministic menu of ``additive-ddt`` (item 2 at ≈ 5.488, the bundle at ≈ 11.942,
item 1 not sold alone), by a coarse-to-fine grid search over the three prices on exact
revenues (tests/test_known_optima.py; spec/optima.md's 9.6995 is 0.0012 higher)."""


def ddt_grand_bundle() -> tuple[float, float]:
    """(revenue, price) of the best grand-bundle price for U[4,16] × U[4,7]: on [8, 11]
    P(v1 + v2 ≥ p) = 1 − (p − 8)²/72, so p = 8 + (√1120 − 16)/6 (the flat part above 11
    prefers p < 11)."""
    p = 8 + (math.sqrt(1120) - 16) / 6
    return p * (1 - (p - 8) ** 2 / 72), p


# --------------------------------------------------------------------------- optima


def _specialists_optimum(setting: str, params: dict) -> KnownOptimum:
    m, high = params["n_items"], params["high"]
    if m < 2 or not 1 < high <= m:
        raise ValueError(f"specialists needs m ≥ 2 and 1 < high ≤ m, got m={m}, high={high}")
    leader = 0.5 + 0.5 * (1 / m + high * (m - 1) / m)
    return KnownOptimum(
        setting, {"n_items": m, "high": high}, 0.5 + 0.5 * high, "exact",
        f"full surplus: a lottery over ≥ 2 items at 1, each item at {high}",
        best_deterministic=leader, best_posted_price=leader,
        posted_price="loss-leader item pricing (one item at 1, the others at high); "
        "bundle-size pricing earns 1",
        source="construction (spec/optima.md)", extra={"bundle_size_pricing": 1.0},
    )  # fmt: skip


def _unit_demand_optimum(setting: str, params: dict) -> KnownOptimum:
    low, high = float(params["low"]), float(params["high"])
    width, c = high - low, low / (high - low)
    revenue, p, q = pavlov_optimum(round(c, 12))
    single, price = single_price_unit_demand(c)
    lottery = q < p
    return KnownOptimum(
        setting, {"low": low, "high": high}, width * revenue,
        "exact" if not lottery else "numerical",
        (f"a ½–½ lottery at {width * q:.5g}, either item at {width * p:.5g}" if lottery
         else f"one price {width * price:.5g} for either item"),
        best_deterministic=width * single, best_posted_price=width * single,
        posted_price=f"one price {width * price:.5g} for either item",
        source="Pavlov 2011 (unit demand, U[c, c+1]²)",
        extra={"item_price": width * p, "lottery_price": width * q},
    )  # fmt: skip


def _ddt_optimum(setting: str, params: dict) -> KnownOptimum:
    optimum = menu_revenue_2d(DDT_BOX, DDT_MENU)
    return KnownOptimum(
        setting, {}, float(optimum), "exact",
        "the lottery (item 1 w.p. ½, item 2) at 8, the bundle at 12",
        best_deterministic=DDT_BEST_DETERMINISTIC, best_posted_price=ddt_grand_bundle()[0],
        posted_price="grand bundle (item pricing 28/3 = 9.3333)",
        source="Daskalakis–Deckelbaum–Tzamos 2017", extra={"optimum_fraction": "88/9"},
    )  # fmt: skip


def _additive_uniform_optimum(setting: str, params: dict) -> KnownOptimum:
    m = params["n_items"]
    if m not in ADDITIVE_UNIFORM_OPTIMA:
        raise ValueError(f"additive U[0,1]^m has a known optimum only for m ≤ 6, got {m}")
    optimum = manelli_vincent_m2() if m == 2 else ADDITIVE_UNIFORM_OPTIMA[m]
    return KnownOptimum(
        setting, {"n_items": m}, optimum, "exact" if m <= 2 else "published",
        "a bundle-size schedule (Straight-Jacket Auction)",
        best_deterministic=optimum, best_posted_price=optimum,
        posted_price="bundle-size pricing", source="Giannakopoulos–Koutsoupias 2018",
    )  # fmt: skip


def _catalogue_optimum(setting: str, params: dict) -> KnownOptimum:
    cat: Catalogue = params["catalogue"]
    shown = {k: v for k, v in params.items() if k != "catalogue"}
    return KnownOptimum(
        setting, shown, float(cat.weights.mean()) / 4, "exact",
        "each catalogue bundle g at w_g/2 (per-bundle Myerson)",
        best_deterministic=float(cat.weights.mean()) / 4,
        source="construction (spec/optima.md)",
        extra={"w_mean": float(cat.weights.mean()), "w_min": float(cat.weights.min()),
               "w_max": float(cat.weights.max())},
    )  # fmt: skip


_OPTIMA = {
    "specialists": _specialists_optimum,
    "unit-demand": _unit_demand_optimum,
    "additive-ddt": _ddt_optimum,
    "additive-uniform": _additive_uniform_optimum,
    "catalogue": _catalogue_optimum,
}


def known_optimum(setting: str, **params) -> KnownOptimum:
    """The optimum of ``setting`` with ``params`` (those of :func:`make_setting`; for
    ``catalogue`` also ``catalogue`` (a :class:`Catalogue`) — the optimum is of the drawn
    catalogue)."""
    if setting not in _OPTIMA:
        raise ValueError(f"unknown setting {setting!r}; known: {', '.join(SETTINGS)}")
    return _OPTIMA[setting](setting, params)


# --------------------------------------------------------------------------- one entry point


DEFAULTS = {
    "specialists": {"n_items": 20, "high": 1.9},
    "unit-demand": {"low": 2.0, "high": 3.0},
    "additive-ddt": {},
    "additive-uniform": {"n_items": 2},
    "catalogue": {"n_items": 50, "catalogue_size": 100, "synergy_max": 4.0, "catalogue_seed": 0},
}
"""Every setting's parameters and their defaults."""

NATURAL_ITEMS = {"unit-demand": 2, "additive-ddt": 2}
"""Settings whose m is fixed."""


def resolve_params(setting: str, **given) -> dict:
    """The setting's parameters: ``given`` (``None`` values ignored) over :data:`DEFAULTS`;
    an unknown setting or parameter raises ``ValueError``."""
    if setting not in DEFAULTS:
        raise ValueError(f"unknown setting {setting!r}; known: {', '.join(SETTINGS)}")
    params = dict(DEFAULTS[setting])
    for key, value in given.items():
        if value is None:
            continue
        if key == "n_items" and setting in NATURAL_ITEMS:
            if value != NATURAL_ITEMS[setting]:
                raise ValueError(f"{setting} has m = {NATURAL_ITEMS[setting]} items, not {value}")
            continue
        if key not in params:
            raise ValueError(f"{setting} takes {sorted(params) or 'no parameters'}, not {key!r}")
        params[key] = value
    return params


# --------------------------------------------------------------------------- optimal mechanisms


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
    return _additive_xor(valuations) if valuations.dim() == 2 else valuations


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


@dataclass(frozen=True)
class KnownSetting:
    """A setting with its parameters: ``sample(n, generator)`` and its ``optimum``."""

    name: str
    params: dict
    optimum: KnownOptimum
    catalogue: Catalogue | None = None

    @property
    def n_items(self) -> int:
        return self.params.get("n_items", NATURAL_ITEMS.get(self.name, 0))

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """``[n, K, m+1]`` valuations."""
        p = self.params
        if self.name == "specialists":
            return specialists(n, generator, n_items=p["n_items"], high=p["high"])
        if self.name == "unit-demand":
            return unit_demand(n, generator, low=p["low"], high=p["high"])
        if self.name == "additive-ddt":
            return additive_ddt(n, generator)
        if self.name == "additive-uniform":
            return additive_uniform(n, generator, n_items=p["n_items"])
        assert self.catalogue is not None
        return catalogue_valuations(self.catalogue, n, generator)

    def optimal_menu(self) -> LotteryMenu | None:
        """The optimal mechanism as an explicit menu (:func:`optimal_menu`), or None."""
        return optimal_menu(self.name, self.params, self.catalogue)

    def optimal_payments(self, valuations: Tensor) -> Tensor | None:
        """``[N]`` float64: what each valuation (``[N, K, m+1]``, or additive ``[N, m]``)
        pays under the optimal menu with the hard rule and the seller-favouring tie-break of
        :func:`menu_payments`; None where no explicit optimal mechanism is known."""
        menu = self.optimal_menu()
        return None if menu is None else menu_payments(valuations, menu)


def make_setting(setting: str, **params) -> KnownSetting:
    """``make_setting("specialists", n_items=20)``: the setting, its parameters (defaults
    filled in) and its optimum; a catalogue is drawn from ``catalogue_seed``."""
    params = resolve_params(setting, **params)
    cat = None
    extra = {}
    if setting == "catalogue":
        gen = torch.Generator().manual_seed(params["catalogue_seed"])
        cat = draw_catalogue(
            params["n_items"], params["catalogue_size"], params["synergy_max"], gen
        )
        extra = {"catalogue": cat}
    optimum = known_optimum(setting, **params, **extra)
    return KnownSetting(setting, params, optimum, cat)


def setting_from_record(known: dict) -> KnownSetting | None:
    """The :class:`KnownSetting` a ``known`` record describes (a data file's ``known``
    metadata or run.json's ``data.known``: :meth:`KnownOptimum.to_dict`), or None when it
    cannot be rebuilt faithfully. A catalogue comes from the record's ``catalogue``
    (``bundles`` as item lists, ``weights``) when present, else it is drawn again from
    ``catalogue_seed``; either way its mean(w_g)/4 must equal the recorded optimum."""
    setting, params = known.get("setting"), known.get("parameters")
    if setting not in SETTINGS or not isinstance(params, dict):
        return None
    try:
        made = make_setting(setting, **params)
    except (ValueError, TypeError, KeyError):
        return None
    stored = known.get("catalogue")
    if setting == "catalogue" and isinstance(stored, dict):
        m = made.n_items
        bundles = torch.zeros(len(stored["bundles"]), m)
        for g, items in enumerate(stored["bundles"]):
            bundles[g, list(items)] = 1.0
        weights = torch.tensor(stored["weights"], dtype=torch.float64)
        made = KnownSetting(made.name, made.params, made.optimum,
                            Catalogue(bundles, weights, made.catalogue.item_values,
                                      made.catalogue.synergy))  # fmt: skip
    recorded = known.get("optimum")
    if setting == "catalogue" and recorded is not None:
        drawn = float(made.catalogue.weights.mean()) / 4
        if not math.isclose(drawn, float(recorded), rel_tol=1e-9):
            return None  # not the catalogue the data were drawn from
    return made


def optimal_payments_for(known: dict, valuations: Tensor) -> Tensor | None:
    """:meth:`KnownSetting.optimal_payments` of the setting a ``known`` record describes
    (:func:`setting_from_record`); None where the optimal mechanism is not explicit or the
    setting cannot be rebuilt."""
    made = setting_from_record(known)
    return None if made is None else made.optimal_payments(valuations)
