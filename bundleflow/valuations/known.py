"""Settings with known optimal revenue (single bidder): the known-optimum suite.

The entry point: :func:`make_setting` gives a :class:`KnownSetting`, which samples the
setting and knows its optimum and optimal mechanism. Each family's sampler
(:mod:`~bundleflow.valuations.known_families`) returns XOR valuations ``[N, K, m+1]`` (0/1
item columns, value last; zero rows pad) drawn from a ``torch.Generator``;
:func:`~bundleflow.valuations.known_optima.known_optimum` gives the setting's exact optimal
revenue (or the closed-form bound it is scored against) with its best deterministic and best
posted-price revenue where known; :mod:`~bundleflow.valuations.known_mechanisms` holds the
optimal mechanisms as explicit menus. Facts and sources: ``spec/optima.md``; every number is
checked in ``tests/test_known_optima.py`` by an exact computation
(:func:`~bundleflow.valuations.known_optima.menu_revenue_2d`: areas of polygons in a uniform
box) or a grid search.

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

Imports torch, the standard library and the other ``known_*`` modules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from bundleflow.valuations.known_families import (
    SETTINGS,
    Catalogue,
    additive_ddt,
    additive_uniform,
    catalogue_valuations,
    draw_catalogue,
    specialists,
    unit_demand,
)
from bundleflow.valuations.known_mechanisms import LotteryMenu, menu_payments, optimal_menu
from bundleflow.valuations.known_optima import (
    ADDITIVE_UNIFORM_OPTIMA as ADDITIVE_UNIFORM_OPTIMA,  # re-exported: train/data.py takes it here
)
from bundleflow.valuations.known_optima import KnownOptimum, known_optimum

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
