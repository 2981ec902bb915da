"""The known-optimum settings' optimal revenues, computed exactly where a closed form or an
exact computation exists: the optimum table of :func:`known_optimum`.

:func:`menu_revenue_2d` is a menu's exact expected revenue for two values uniform on a box
(areas of polygons); Pavlov's menus for unit demand are optimised on it by a grid search.
Facts and sources: ``spec/optima.md``; every number is checked in
``tests/test_known_optima.py``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction

from bundleflow.valuations.known_families import DDT_BOX, SETTINGS, Catalogue

ADDITIVE_UNIFORM_OPTIMA = {1: 0.25, 2: 0.549, 3: 0.875, 4: 1.219, 5: 1.576, 6: 1.943}
"""Optimal revenue of additive U[0,1]^m (m = 1: Myerson price ½; m = 2: Manelli–Vincent,
exactly 0.54907 by :func:`manelli_vincent_m2`; m = 3..6: Giannakopoulos–Koutsoupias 2018,
three decimals as published). The optimum is a bundle-size schedule for every m ≤ 6."""


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
