"""Hard and soft revenue on a hand-computed two-item auction.

Items a, b. Menu (D = 2 support points per element):
  e0: {a} surely, price 3      e1: {a, b} surely, price 5
  e2: {b} or {a, b} with probability ½ each, price 4
Valuations (XOR):
  v1: {a}:4, {a,b}:6   u = (1, 1, −1)     tie e0/e1 -> lowest index e0, pays 3
  v2: {b}:1            u = (−3, −4, −3)   max < 0 -> walks away, pays 0
  v3: {a,b}:9, {b}:8   u = (−3, 4, 4.5)   buys e2, pays 4
  v4: {a}:3            u = (0, −2, −2.5)  max = 0 -> buys e0 (buy iff max ≥ 0), pays 3
Hard revenue = (3 + 0 + 4 + 3) / 4 = 2.5.
"""

from __future__ import annotations

import math

import torch

from bundleflow.maths.menu import lottery_utilities
from bundleflow.maths.revenue import WALK_AWAY, hard_outcome, hard_revenue, soft_revenue

A, B, AB = [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]
BUNDLES = torch.tensor([[A, A], [AB, AB], [B, AB]])
ALPHA = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.5, 0.5]])
PRICES = torch.tensor([3.0, 5.0, 4.0])


def xor(*atoms):
    rows = [items + [value] for items, value in atoms]
    rows += [[0.0, 0.0, 0.0]] * (2 - len(rows))  # zero-row padding to K = 2
    return rows


VALUATIONS = torch.tensor(
    [xor((A, 4.0), (AB, 6.0)), xor((B, 1.0)), xor((AB, 9.0), (B, 8.0)), xor((A, 3.0))]
)


def test_utilities_by_hand():
    u = lottery_utilities(BUNDLES, ALPHA, PRICES, VALUATIONS)
    want = torch.tensor([[1.0, 1.0, -1.0], [-3.0, -4.0, -3.0], [-3.0, 4.0, 4.5], [0.0, -2.0, -2.5]])
    assert torch.equal(u, want)


def test_hard_outcome_ties_walk_away_and_zero_utility():
    u = lottery_utilities(BUNDLES, ALPHA, PRICES, VALUATIONS)
    choice, payment = hard_outcome(u, PRICES)
    assert choice.tolist() == [0, WALK_AWAY, 2, 0]
    assert payment.tolist() == [3.0, 0.0, 4.0, 3.0]
    assert float(hard_revenue(u, PRICES)) == 2.5


def test_ties_go_to_lowest_index_anywhere():
    u = torch.tensor([[0.5, 2.0, 2.0, 2.0], [2.0, 1.0, 2.0, -1.0]])
    choice, payment = hard_outcome(u, torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert choice.tolist() == [1, 0]
    assert payment.tolist() == [2.0, 1.0]


def test_soft_revenue_closed_form():
    u = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    p = torch.tensor([2.0, 7.0])
    lam = 0.7
    want = 0.0
    for row in u.tolist():
        weights = [math.exp(lam * x) for x in row + [0.0]]  # the walk-away column
        want += sum(w * price for w, price in zip(weights, [2.0, 7.0, 0.0], strict=True)) / sum(
            weights
        )
    want /= 2
    assert math.isclose(float(soft_revenue(u, p, lam)), want, rel_tol=1e-6)


def test_soft_revenue_tends_to_hard_revenue_at_low_temperature():
    u = lottery_utilities(BUNDLES, ALPHA, PRICES, VALUATIONS)
    u = u + torch.tensor([[0.0, -1e-3, 0.0]] * 4)  # break the v1 tie so the limit is unique
    u[3, 0] = 1e-3  # and v4's zero utility
    assert math.isclose(float(soft_revenue(u, PRICES, 1e5)), 2.5, rel_tol=1e-4)


def test_additive_utilities_use_expected_bundle():
    v = torch.tensor([[0.3, 0.9]])
    u = lottery_utilities(BUNDLES, ALPHA, PRICES, v)
    want = torch.tensor([[0.3 - 3.0, 1.2 - 5.0, 0.5 * 0.9 + 0.5 * 1.2 - 4.0]])
    assert torch.allclose(u, want)
