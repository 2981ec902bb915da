"""The known settings' optimal mechanisms as per-valuation payments (``optimal_payments``):
hand-computed tiny auctions, a scalar brute force, Monte Carlo against each stated optimum, and
the report's paired ratio to the optimum (sampling noise is not an evaluation bug; a planted
one is)."""

from __future__ import annotations

import math

import pytest
import torch

from bundleflow.cli.suite import summarise
from bundleflow.evaluation.evaluate import evaluate_mechanism, mean_ci, optimum_comparison
from bundleflow.evaluation.mechanism import FrozenMechanism
from bundleflow.evaluation.report import (
    ABOVE_OPTIMUM,
    comparison_table,
    format_summary,
    optimum_record,
)
from bundleflow.valuations import known as k
from bundleflow.valuations.known_mechanisms import TIE_TOL, LotteryMenu, as_xor

F32 = float(torch.tensor(1.9, dtype=torch.float32))  # 1.9 as stored


def _xor(rows: list[list[tuple[list[int], float]]], m: int) -> torch.Tensor:
    """XOR valuations ``[N, K, m+1]`` from atom lists ``[([items], value), ...]``."""
    k_max = max(len(r) for r in rows)
    out = torch.zeros(len(rows), k_max, m + 1)
    for n, atoms in enumerate(rows):
        for a, (items, value) in enumerate(atoms):
            out[n, a, items] = 1.0
            out[n, a, m] = value
    return out


def _brute_force(vals: torch.Tensor, menu: LotteryMenu) -> list[float]:
    """Scalar loops: each option's expected XOR value, utility; the highest utility (≥ 0,
    within the tie tolerance) and among ties the dearest option."""
    m = vals.shape[2] - 1
    out = []
    for row in vals.double().tolist():
        atoms = [(set(i for i in range(m) if a[i] > 0), a[m]) for a in row]
        utilities = []
        for j in range(menu.prices.shape[0]):
            value = 0.0
            for d in range(menu.probs.shape[1]):
                bundle = set(menu.bundles[j, d].nonzero().squeeze(1).tolist())
                best = max([v for s, v in atoms if s <= bundle] + [0.0])
                value += float(menu.probs[j, d]) * best
            utilities.append((value - float(menu.prices[j]), float(menu.prices[j])))
        tol = TIE_TOL * max(1.0, float(menu.prices.abs().max()))
        top = max(u for u, _ in utilities)
        chosen = [p for u, p in utilities if u >= top - tol and u >= -tol]
        out.append(max(chosen) if chosen else 0.0)
    return out


def _check(setting: k.KnownSetting, vals: torch.Tensor, expected: list[float]) -> None:
    pay = setting.optimal_payments(vals)
    assert pay.dtype == torch.float64 and pay.shape == (vals.shape[0],)
    assert pay.tolist() == pytest.approx(expected, abs=1e-6)
    assert pay.tolist() == pytest.approx(_brute_force(vals, setting.optimal_menu()), abs=1e-12)


# --------------------------------------------------------------------------- hand-computed


def test_specialists_every_bidder_pays_its_value():
    s = k.make_setting("specialists", n_items=3, high=1.9)
    menu = s.optimal_menu()  # a ½–½ lottery over items 1, 2 at 1; each item at 1.9
    assert menu.prices.tolist() == [1.0, 1.9, 1.9, 1.9]
    spec = [([i], 1.0) for i in range(3)]
    vals = _xor([spec, [([0], 1.9)], [([2], 1.9)], [([1], 0.5)]], 3)
    # specialist: lottery 1 − 1 = 0 (buys at a tie); flexible: lottery 0.95 − 1 < 0, item 0;
    # a type outside the setting (one item at 0.5) buys nothing
    _check(s, vals, [1.0, 1.9, 1.9, 0.0])
    sample = s.sample(2000, torch.Generator().manual_seed(0))
    assert torch.allclose(s.optimal_payments(sample), sample[..., 3].double().amax(1), atol=1e-6)


def test_specialists_integer_high_tie_goes_to_the_dearer_option():
    s = k.make_setting("specialists", n_items=3, high=2.0)
    # flexible on item 0: lottery over {0, 1} at 1 gives 2·½ − 1 = 0, item 0 at 2 gives 0
    vals = _xor([[([0], 2.0)], [([2], 2.0)], [([i], 1.0) for i in range(3)]], 3)
    _check(s, vals, [2.0, 2.0, 1.0])


def test_unit_demand_pavlov_menu():
    s = k.make_setting("unit-demand")
    p, q = s.optimum.extra["item_price"], s.optimum.extra["lottery_price"]
    assert q == pytest.approx(2.1151, abs=1e-3) and p == pytest.approx(2.2817, abs=1e-3)
    pairs = [(2.0, 2.0), (2.2, 2.2), (3.0, 2.0), (2.3, 2.28), (2.1, 2.9)]
    vals = _xor([[([0], a), ([1], b)] for a, b in pairs], 2)
    # (2, 2): lottery 2 < q, items < p: walks; (2.2, 2.2): only the lottery; (3, 2): item
    # 0.718 > lottery 0.385; (2.3, 2.28): lottery 0.175 > item 0.018; (2.1, 2.9): item 0.618
    _check(s, vals, [0.0, q, p, q, p])
    null = k.make_setting("unit-demand", low=0.0, high=1.0)
    assert null.optimal_menu().prices.tolist() == pytest.approx([1 / math.sqrt(3)] * 2)
    vals = _xor([[([0], 0.5), ([1], 0.6)], [([0], 0.5), ([1], 0.5)]], 2)
    _check(null, vals, [1 / math.sqrt(3), 0.0])


def test_ddt_menu_and_its_tie():
    s = k.make_setting("additive-ddt")
    vals = as_xor(torch.tensor([[4.0, 4.0], [10.0, 5.0], [6.0, 6.0], [8.0, 6.0], [5.0, 4.0]]))
    # (4,4): lottery 6 < 8, bundle 8 < 12; (10,5): bundle 3 > lottery 2; (6,6): lottery 1 >
    # bundle 0; (8,6): both 2 — the bundle (dearer); (5,4): lottery 6.5 < 8, bundle 9 < 12
    _check(s, vals, [0.0, 12.0, 8.0, 12.0, 0.0])


def test_manelli_vincent_menu_and_m3_has_none():
    s = k.make_setting("additive-uniform", n_items=2)
    item, bundle = 2 / 3, (4 - math.sqrt(2)) / 3
    values = torch.tensor([[0.7, 0.1], [0.5, 0.5], [0.3, 0.3], [0.1, 0.95], [0.9, 0.9]])
    expected = [item, bundle, 0.0, item, bundle]  # (0.9, 0.9): bundle 0.938 > item 0.233
    _check(s, as_xor(values), expected)
    assert s.optimal_payments(values).tolist() == pytest.approx(expected)  # additive [N, m]
    assert k.make_setting("additive-uniform", n_items=3).optimal_payments(values) is None


def test_catalogue_each_bundle_at_half_its_weight():
    s = k.make_setting("catalogue", n_items=8, catalogue_size=4, synergy_max=4.0)
    cat = s.catalogue
    rows, expected = [], []
    for g in range(4):
        w = float(cat.weights[g])
        items = cat.bundles[g].nonzero().squeeze(1).tolist()
        for share, pays in ((0.6, True), (0.4, False), (1.0, True)):
            rows.append([(items, share * w)])
            expected.append(w / 2 if pays else 0.0)
    _check(s, _xor(rows, 8), expected)


def test_setting_from_record_rebuilds_the_mechanism():
    for name, params in (("specialists", {"n_items": 4}), ("unit-demand", {}),
                         ("additive-ddt", {}), ("catalogue", {"n_items": 10,
                                                              "catalogue_size": 6})):  # fmt: skip
        s = k.make_setting(name, **params)
        vals = s.sample(500, torch.Generator().manual_seed(1))
        record = s.optimum.to_dict()
        assert torch.equal(k.optimal_payments_for(record, vals), s.optimal_payments(vals))
    # a catalogue record: the stored w_g are used; one that is not this catalogue is refused
    stored = {"bundles": [r.nonzero().squeeze(1).tolist() for r in s.catalogue.bundles],
              "weights": s.catalogue.weights.tolist()}  # fmt: skip
    assert torch.equal(
        k.optimal_payments_for({**record, "catalogue": stored}, vals), s.optimal_payments(vals)
    )
    assert k.optimal_payments_for({**record, "optimum": record["optimum"] * 1.1}, vals) is None
    assert k.optimal_payments_for({"setting": "cats", "optimum": 1.0}, vals) is None


# --------------------------------------------------------------------------- Monte Carlo


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("specialists", {"n_items": 20}),
        ("unit-demand", {}),
        ("unit-demand", {"low": 0.0, "high": 1.0}),
        ("additive-ddt", {}),
        ("additive-uniform", {"n_items": 2}),
        ("catalogue", {}),
    ],
)
def test_optimal_payments_earn_the_stated_optimum(name, params):
    s = k.make_setting(name, **params)
    pay = s.optimal_payments(s.sample(200_000, torch.Generator().manual_seed(11)))
    se = float(pay.std()) / math.sqrt(pay.numel())
    assert abs(float(pay.mean()) - s.optimum.optimum) <= 4 * se, (float(pay.mean()), se)


# --------------------------------------------------------------------------- the report


def _full_surplus_mechanism(m: int) -> FrozenMechanism:
    """Specialists' optimal menu as a frozen mechanism: a ½–½ lottery over items 1, 2 at 1,
    each item at 1.9 (as float32, like the stored values)."""
    bundles = torch.zeros(m + 1, 2, m, dtype=torch.uint8)
    bundles[0, 0, 0] = bundles[0, 1, 1] = 1
    for i in range(m):
        bundles[i + 1, :, i] = 1
    prices = torch.tensor([1.0] + [1.9] * m)
    return FrozenMechanism(bundles, torch.full((m + 1, 2), 0.5), prices,
                           torch.zeros(bundles.shape), mix_temp=1.0)  # fmt: skip


def test_full_surplus_on_a_lucky_sample_is_not_flagged_and_a_planted_bug_is():
    m = 4
    s = k.make_setting("specialists", n_items=m)
    known = s.optimum.to_dict()
    draws = s.sample(40_000, torch.Generator().manual_seed(3))
    flexible = draws[..., m].amax(1) > 1.5
    # a test sample whose realised full surplus is well above the population's 1.45
    test = torch.cat([draws[flexible][:12_000], draws[~flexible][:8_000]])
    train = draws[-5000:]
    mech = _full_surplus_mechanism(m)
    report = evaluate_mechanism(mech, test, train, known=known)
    assert report["revenue"]["mean"] == pytest.approx(0.6 * 1.9 + 0.4, abs=1e-5)
    # unpaired, the sampling noise reads as an evaluation bug ...
    assert optimum_record(report, known)["above_optimum"]
    # ... paired on the same valuations it is a ratio of 1
    opt = report["optimum"]
    assert opt["paired"] and not opt["above_optimum"]
    assert opt["optimal_on_test"]["mean"] == pytest.approx(report["revenue"]["mean"], rel=1e-6)
    lo, hi = opt["ratio"]["ci95"]
    assert abs(opt["ratio"]["ratio"] - 1) < 1e-6 and 1 - 1e-6 < lo <= hi < 1 + 1e-6
    table = comparison_table(report)
    assert "ratio to optimum (paired)" in table and ABOVE_OPTIMUM not in table
    assert "optimal mechanism on these test valuations" in table
    assert "ratio to it (paired): 1" in format_summary(report)
    assert not [f for f in summarise(report)["flags"] if "menu" in f]
    # a planted evaluation bug: payments 1% too high on the same valuations
    payment = mech.outcome(test)[1].double()
    bugged = optimum_comparison(known, test, {"menu": payment * 1.01}, mean_ci(payment * 1.01))
    assert bugged["paired"] and bugged["above_optimum"]
    assert bugged["ratio"]["ratio"] == pytest.approx(1.01, abs=1e-6)
    assert f"ratio to optimum (paired) ({ABOVE_OPTIMUM})" in comparison_table(
        {**report, "optimum": bugged}
    )
    assert f"menu {ABOVE_OPTIMUM}" in summarise({**report, "optimum": bugged})["flags"]


def test_no_explicit_mechanism_keeps_the_unpaired_row():
    known = k.make_setting("additive-uniform", n_items=3).optimum.to_dict()
    values = torch.rand(1000, 3, generator=torch.Generator().manual_seed(0))
    payment = torch.full((1000,), 0.8)
    record = optimum_comparison(known, values, {"menu": payment}, mean_ci(payment))
    assert not record["paired"] and "optimal_on_test" not in record
    assert record["ratio"]["ratio"] == pytest.approx(0.8 / 0.875)
    assert record["ratio"]["method"].startswith("unpaired")
    report = {"revenue": mean_ci(payment), "fraction_of_max_value": 0.5,
              "expected_max_value": 1.5, "optimum": record}  # fmt: skip
    assert "ratio to optimum (unpaired)" in comparison_table(report)
