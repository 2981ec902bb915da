"""The issue-17 experiment scripts' building blocks against hand-computed answers:
choice lotteries' values (scripts/size_lottery_experiment.py) and the information
relaxation's monopoly prices (scripts/information_relaxation.py)."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from tests.conftest import REPO


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


lottery = _load("size_lottery_experiment")
relax = _load("information_relaxation")


def _bidder(m: int, atoms: list[tuple[list[int], float]], k: int = 3) -> torch.Tensor:
    v = torch.zeros(1, k, m + 1)
    for j, (items, value) in enumerate(atoms):
        v[0, j, items] = 1.0
        v[0, j, -1] = value
    return v


def test_choice_lottery_values_by_hand():
    # m=4, atoms {0,1}: 10 and {2,3}: 6 (both size 2). Columns: k = 1..4 for n = 2, then n = 3.
    values = lottery.choice_values(_bidder(4, [([0, 1], 10.0), ([2, 3], 6.0)]), [2, 3])
    got = values.view(2, 4)
    no = -lottery.NOT_SOLD
    # n=2: k=1 nothing fits; k=2 the two atoms, mean 8; k=3 two supersets of {0,1} (C(2,1)=2),
    # 10; k=4 there is one bundle of 4 items, so two distinct names cannot exist.
    assert got[0].tolist() == pytest.approx([no, 8.0, 10.0, no])
    # n=3: k=2 the third name is worth 0: 16/3; k=3 two supersets of {0,1}, one of {2,3}: 26/3.
    assert got[1].tolist() == pytest.approx([no, 16 / 3, 26 / 3, no])


def test_monopoly_price_and_cells_by_hand():
    assert relax.monopoly(torch.tensor([10.0, 6.0, 3.0], dtype=torch.float64)) == 6.0  # 10, 12, 9
    keys = torch.tensor([1] * relax.MIN_CELL + [2] * (relax.MIN_CELL - 1))
    v = torch.cat([torch.full((relax.MIN_CELL,), 5.0), torch.ones(relax.MIN_CELL - 1)]).double()
    assert relax.fit(keys, v) == {1: 5.0}  # cell 2 is too small to fit
    # Cell 2's bidders fall back to their size's price (here 0.5: they buy); unknown: inf.
    v = torch.tensor([4.0, 1.0, 9.0], dtype=torch.float64)
    paid = relax.pay(torch.tensor([1, 2, 3]), torch.tensor([7, 7, 8]), v, {1: 5.0}, {7: 0.5})
    assert paid.tolist() == [0.0, 0.5, 0.0]


def test_relaxation_features_by_hand():
    vals = torch.cat([
        _bidder(4, [([0, 1], 10.0), ([2, 3], 6.0)]),
        _bidder(4, [([1], 4.0)]),
    ])  # fmt: skip
    v, s, k, b, edges = relax.features(vals, torch.tensor([0.5], dtype=torch.float64), 2)
    assert v.tolist() == [10.0, 4.0] and s.tolist() == [2, 1] and k.tolist() == [2, 1]
    assert b.tolist() == [1, 0]  # r2 = 0.6 above the edge 0.5; a single atom has r2 = 0
    assert not math.isnan(float(edges[0]))


def test_flow_quality_proxies_of_a_flow_that_empties_every_bundle():
    # Q ≡ -5 and σ ≡ 1: each of the 5 Euler steps multiplies z by (1 - 5/5) = 0, so every end
    # point is 0: all bundles empty, exactly at a corner, and no start point's move flips one.
    from bundleflow.maths.flow import VelocityField

    quality = _load("flow_quality")
    field = VelocityField(6, 8, 8)
    with torch.no_grad():
        for layer in (field.fc3, field.fct2):
            layer.weight.zero_()
        field.fc3.bias.fill_(-5.0)
        field.fct2.bias.fill_(1.0)
    got = quality.proxies(field, n_points=4096)
    assert got["size/m"] == 0.0 and got["flips"] == 0.0 and got["off_corner"] == 0.0
    assert got["decided"] == pytest.approx(0.5)
    assert got["distinct"] == 1 / 4096
    assert got["agree_0.5"] == pytest.approx(0.5, abs=0.02)  # the share of z0 below 0.5
    assert quality.spearman([1.0, 2.0, 3.0], [30.0, 20.0, 10.0]) == pytest.approx(-1.0)
