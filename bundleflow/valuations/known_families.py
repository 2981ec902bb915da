"""The known-optimum families' samplers: XOR valuations ``[N, K, m+1]`` (0/1 item columns,
value last; zero rows pad) drawn from a ``torch.Generator``.

The settings, their parameters and their optima are described in
:mod:`bundleflow.valuations.known`, the suite's entry point. Imports torch only (and the
standard library).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

SETTINGS = ("specialists", "unit-demand", "additive-ddt", "additive-uniform", "catalogue")
"""The known-optimum settings, by name."""

DDT_BOX = ((4, 16), (4, 7))
"""Supports of the two additive items of ``additive-ddt``."""

CATALOGUE_SIZES = (3, 5)
"""Smallest and largest catalogue bundle (items)."""


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


def additive_xor(values: Tensor) -> Tensor:
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
    return additive_xor(values)


def additive_uniform(n: int, generator: torch.Generator, *, n_items: int = 2) -> Tensor:
    """``[n, 2^m − 1, m+1]``: additive U[0,1]^m as XOR atoms (m ≤ 6 has a known optimum)."""
    if not 1 <= n_items <= 10:
        raise ValueError(f"additive-uniform as XOR needs 1 ≤ m ≤ 10, got {n_items}")
    return additive_xor(torch.rand(n, n_items, generator=generator, dtype=torch.float64))


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
