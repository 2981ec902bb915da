"""scripts/cats_cover_model.py: the random-cover model of a finite menu on exchangeable CATS
atoms (BENCHMARKS.md, fourth pass) against brute force and its exact limits."""

from __future__ import annotations

import importlib.util
import itertools

import pytest
import torch

from bundleflow.evaluation.baselines import bundle_size_outcome, fit_bundle_size_prices
from tests.conftest import REPO


def _script():
    spec = importlib.util.spec_from_file_location(
        "cats_cover_model", REPO / "scripts" / "cats_cover_model.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _one_size_bidders(n: int, m: int, k: int, seed: int) -> torch.Tensor:
    """XOR valuations whose atoms share one size per bidder (as under CATS)."""
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(n, k, m + 1)
    for i in range(n):
        s = int(torch.randint(1, m + 1, (1,), generator=g))
        for j in range(int(torch.randint(1, k + 1, (1,), generator=g))):
            out[i, j, torch.randperm(m, generator=g)[:s]] = 1.0
            out[i, j, m] = s * (0.5 + float(torch.rand(1, generator=g)))
    return out


def test_containment_equals_counting_subsets():
    m = 6
    table = _script().containment(m)
    items = range(m)
    for t in range(m + 1):
        bundle = set(range(t))
        for s in range(m + 1):
            subsets = list(itertools.combinations(items, s))
            inside = sum(set(a) <= bundle for a in subsets)
            assert table[t, s].item() == pytest.approx(inside / len(subsets), abs=1e-15)


def test_every_atom_on_the_menu_is_bundle_size_pricing_and_fewer_bundles_earn_less():
    mod = _script()
    vals = _one_size_bidders(400, 8, 3, seed=5)
    prices = fit_bundle_size_prices(vals.double())
    model = mod.CoverModel(vals, prices)
    assert model.bsp.sum() == bundle_size_outcome(vals, prices)[1].sum() > 0
    tight = {s: s for s in range(9)}
    assert model.ratio(dict.fromkeys(range(1, 9), 1e30), tight) == pytest.approx(1.0, abs=1e-12)
    few = model.ratio(dict.fromkeys(range(1, 9), 2.0), tight)
    assert 0 < few < 1
    best, sizes = model.best(16, passes=1)
    assert few < best <= 1 and all(s <= t <= 8 for s, t in sizes.items())
