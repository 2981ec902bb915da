"""Baselines against hand-computed auctions, closed forms and brute-force loops."""

from __future__ import annotations

import math

import pytest
import torch

from bundleflow.evaluation.baselines import (
    bundle_size_outcome,
    effective_size_prices,
    fit_baselines,
    fit_bundle_size_prices,
    fit_grand_bundle_price,
    fit_item_prices,
    fit_uniform_item_price,
    grand_bundle_payments,
    item_price_outcome,
)
from bundleflow.evaluation.evaluate import baselines_report, paired_ratio_ci
from bundleflow.maths.revenue import WALK_AWAY
from bundleflow.valuations import known

INF = math.inf


def xor(*bidders: list[tuple[set[int], float]], m: int) -> torch.Tensor:
    """XOR valuations ``[N, K, m+1]`` from lists of (items, value), zero-padded."""
    k = max(len(b) for b in bidders)
    out = torch.zeros(len(bidders), k, m + 1)
    for n, atoms in enumerate(bidders):
        for j, (items, value) in enumerate(atoms):
            for i in items:
                out[n, j, i] = 1.0
            out[n, j, m] = value
    return out


def random_xor(n: int, m: int, k: int, seed: int, integer: bool = False) -> torch.Tensor:
    """Random XOR valuations: atoms of random size, values growing with size."""
    g = torch.Generator().manual_seed(seed)
    atoms = (torch.rand(n, k, m, generator=g) < 0.3).float()
    size = atoms.sum(-1)
    values = size * (0.5 + torch.rand(n, k, generator=g))
    if integer:
        values = values.round()
    values = torch.where(size > 0, values, 0.0)
    return torch.cat([atoms, values[..., None]], dim=-1)


A = [({0}, 3.0), ({1}, 2.0), ({0, 1}, 6.0)]


# --------------------------------------------------------------------------- hand-computed


def test_item_prices_hand_computed_with_ties_and_walk_away():
    vals = xor(A, A, A, [({0}, 1.0)], m=2)
    prices = torch.tensor([2.0, 2.0])
    choice, pay = item_price_outcome(vals[:1], prices)
    assert choice.tolist() == [2] and pay.tolist() == [4.0]  # u = 1, 0, 2
    choice, pay = item_price_outcome(vals[:1], torch.tensor([3.0, 3.0]))
    assert choice.tolist() == [0] and pay.tolist() == [3.0]  # u = 0, −1, 0: lowest index
    choice, pay = item_price_outcome(vals[:1], torch.tensor([4.0, 4.0]))
    assert choice.tolist() == [WALK_AWAY] and pay.tolist() == [0.0]  # u = −1, −2, −2
    # utility exactly 0 buys (the padding row also has utility 0 but a higher index)
    choice, pay = item_price_outcome(vals[3:], torch.tensor([1.0, 5.0]))
    assert choice.tolist() == [0] and pay.tolist() == [1.0]


def test_bundle_size_prices_hand_computed():
    q = torch.tensor([0.0, 5.0, 4.0])  # a single item costs 5, a pair 4: singles pay 4
    assert effective_size_prices(q).tolist() == [0.0, 4.0, 4.0]
    vals = xor(A, [({1}, 4.5)], [({1}, 3.0)], m=2)
    choice, pay = bundle_size_outcome(vals, q)
    assert choice.tolist() == [2, 0, WALK_AWAY]  # u(A) = −1, −2, 2; 0.5; −1
    assert pay.tolist() == [4.0, 4.0, 0.0]
    # a size not for sale (inf) falls back to the cheapest larger size
    assert effective_size_prices(torch.tensor([0.0, INF, 7.0, INF])).tolist() == [0, 7, 7, INF]


def test_grand_bundle_closed_form_hand_computed():
    vals = xor([({0}, 10.0)], [({1}, 6.0)], [({0, 1}, 5.0)], [({0}, 1.0)], m=2)
    price = fit_grand_bundle_price(vals)  # i·v_(i) = 10, 12, 15, 4
    assert price == 5.0
    assert grand_bundle_payments(vals, price).tolist() == [5.0, 5.0, 5.0, 0.0]


def test_uniform_price_on_a_hand_computed_set():
    # one bidder per atom size 1, value 4: uniform price 4 takes 4 from each of 3 bidders
    vals = xor([({0}, 4.0)], [({1}, 4.0)], [({0, 1}, 8.0)], m=2)
    assert fit_uniform_item_price(vals) == pytest.approx(4.0)


# --------------------------------------------------------------------------- closed forms


def test_additive_one_item_price_is_one_half_and_revenue_one_quarter():
    g = torch.Generator().manual_seed(0)
    train, test = torch.rand(200_000, 1, generator=g), torch.rand(200_000, 1, generator=g)
    prices = fit_item_prices(train)
    assert prices.item() == pytest.approx(0.5, abs=0.01)
    pay = item_price_outcome(test, prices)[1]
    se = float(pay.std()) / math.sqrt(pay.numel())
    assert abs(float(pay.mean()) - 0.25) < 4 * se + 1e-4


def test_additive_two_items_at_one_half_give_one_half():
    g = torch.Generator().manual_seed(1)
    test = torch.rand(200_000, 2, generator=g)
    pay = item_price_outcome(test, torch.tensor([0.5, 0.5]))[1]
    se = float(pay.std()) / math.sqrt(pay.numel())
    assert abs(float(pay.mean()) - 0.5) < 4 * se
    report = baselines_report(torch.rand(20_000, 2, generator=g), test)
    item = report["mechanisms"]["item_pricing"]["revenue"]["mean"]
    assert item == pytest.approx(0.5, abs=0.01)
    # grand bundle of two U[0,1] items: 0.5443 at P = √(2/3)
    assert report["mechanisms"]["grand_bundle"]["revenue"]["mean"] == pytest.approx(
        0.5443, abs=0.01
    )
    assert report["expected_max_value"] == pytest.approx(1.0, abs=0.01)


def test_xor_grand_bundle_closed_form_uniform_max_value():
    # one atom (the grand bundle) worth U[0,1]: the best price is 1/2, revenue 1/4
    g = torch.Generator().manual_seed(2)
    n, m = 100_000, 3
    vals = torch.zeros(n, 1, m + 1)
    vals[:, 0, :m] = 1.0
    vals[:, 0, m] = torch.rand(n, generator=g)
    price = fit_grand_bundle_price(vals)
    assert price == pytest.approx(0.5, abs=0.01)
    pay = grand_bundle_payments(vals, price)
    assert float(pay.mean()) == pytest.approx(0.25, abs=0.005)


# --------------------------------------------------------------------------- fitting properties


def test_item_pricing_at_least_uniform_on_train():
    train = random_xor(2000, 8, 4, seed=3)
    uniform = fit_uniform_item_price(train)
    prices = fit_item_prices(train, start=uniform)
    rev_uniform = item_price_outcome(train, torch.full((8,), uniform))[1].mean()
    rev_items = item_price_outcome(train, prices)[1].mean()
    assert rev_items >= rev_uniform
    assert (prices >= 0).all()


def test_outcomes_match_a_brute_force_loop():
    vals = random_xor(300, 6, 4, seed=4, integer=True)  # integer values: many exact ties
    prices = torch.tensor([1.0, 2.0, 1.0, 3.0, 0.0, 2.0])
    q = torch.tensor([0.0, 3.0, 2.0, 6.0, 9.0, 8.0, INF])
    item_choice, item_pay = item_price_outcome(vals, prices)
    size_choice, size_pay = bundle_size_outcome(vals, q)
    for n in range(vals.shape[0]):
        for price_of, choice, pay in (
            (lambda items: sum(prices[i].item() for i in items), item_choice, item_pay),
            (
                lambda items: 0.0 if not items else min(q[len(items) :].tolist()),
                size_choice,
                size_pay,
            ),
        ):
            best, best_k, best_p = -INF, WALK_AWAY, 0.0
            for k, row in enumerate(vals[n].tolist()):
                items = [i for i in range(6) if row[i] > 0.5]
                if not items:  # a padding row is no purchase
                    continue
                u = row[-1] - price_of(items)
                if u > best:  # strict: the lowest index keeps a tie
                    best, best_k, best_p = u, k, price_of(items)
            if best < 0:
                best_k, best_p = WALK_AWAY, 0.0
            assert int(choice[n]) == best_k and float(pay[n]) == best_p


def test_bundle_size_prices_respect_the_min_over_larger_sizes():
    train = random_xor(2000, 8, 4, seed=5)
    q = fit_bundle_size_prices(train)
    eff = effective_size_prices(q)
    for s in range(1, 9):
        assert eff[s] == min(q[s:].tolist())
    sizes = train[..., :-1].sum(-1).long()
    choice, pay = bundle_size_outcome(train, q)
    bought = choice >= 0
    chosen_size = sizes.gather(1, choice.clamp(min=0)[:, None]).squeeze(1)
    assert torch.equal(pay[bought], eff[chosen_size[bought]])
    # the ascent never loses to its per-size start on the training split
    assert float(pay.mean()) > 0


@pytest.mark.parametrize("factor", [0.01, 100.0])
def test_baselines_are_scale_equivariant(factor):
    train, test = random_xor(600, 8, 4, seed=6), random_xor(300, 8, 4, seed=7)
    scaled = lambda v: torch.cat([v[..., :-1], v[..., -1:] * factor], dim=-1)  # noqa: E731
    base = fit_baselines(train)
    other = fit_baselines(scaled(train))
    assert other.uniform_price == pytest.approx(base.uniform_price * factor, rel=1e-6)
    assert torch.allclose(other.item_prices, base.item_prices * factor, rtol=1e-6)
    a = baselines_report(train, test)["mechanisms"]
    b = baselines_report(scaled(train), scaled(test))["mechanisms"]
    for name, entry in a.items():
        assert b[name]["fraction_of_max_value"] == pytest.approx(
            entry["fraction_of_max_value"], rel=1e-6
        ), name


def test_baselines_report_shape():
    report = baselines_report(random_xor(500, 6, 3, seed=8), random_xor(200, 6, 3, seed=9))
    mechs = report["mechanisms"]
    assert set(mechs) == {
        "grand_bundle",
        "uniform_item_price",
        "item_pricing",
        "bundle_size_pricing",
        "upper_bound",
    }
    assert mechs["upper_bound"]["fraction_of_max_value"] == 1.0
    for entry in mechs.values():
        assert entry["n_test"] == 200
        assert entry["fraction_of_max_value"] <= 1.0
    best = report["best_baseline"]
    assert mechs[best]["ratio_to_best_baseline"]["ratio"] == 1.0


# --------------------------------------------------------------------------- paired ratio


def test_paired_ratio_exact_multiple_has_zero_width():
    b = torch.rand(1000, generator=torch.Generator().manual_seed(10))
    r = paired_ratio_ci(1.5 * b, b)
    assert r["ratio"] == pytest.approx(1.5)
    assert r["ci95"][1] - r["ci95"][0] == pytest.approx(0.0, abs=1e-6)


def test_paired_ratio_ci_width_and_coverage_on_a_known_model():
    # a_i = 1.2·b_i + e_i, e ~ N(0, 0.1²) independent of b ~ U[1, 3]: the true ratio is 1.2
    # and the delta-method half-width is 1.96·0.1/(√n·E b) = 1.96·0.1/(√n·2)
    g = torch.Generator().manual_seed(11)
    n, reps = 400, 400
    b = 1 + 2 * torch.rand(reps, n, generator=g, dtype=torch.float64)
    a = 1.2 * b + 0.1 * torch.randn(reps, n, generator=g, dtype=torch.float64)
    covered, widths = 0, []
    for r in range(reps):
        ci = paired_ratio_ci(a[r], b[r])["ci95"]
        covered += ci[0] <= 1.2 <= ci[1]
        widths.append(ci[1] - ci[0])
    assert 0.92 <= covered / reps <= 0.98
    expected = 2 * 1.959964 * 0.1 / (math.sqrt(n) * 2.0)
    assert sum(widths) / reps == pytest.approx(expected, rel=0.05)


def test_fitted_baselines_are_cached_by_the_training_split(tmp_path, monkeypatch):
    """The second run on the same training split reads the fit back (identical prices, no
    refit); another split is fitted anew."""
    import bundleflow.train.data as run_data
    from bundleflow.evaluation.baselines import fit_baselines

    monkeypatch.setenv("BUNDLEFLOW_CACHE", str(tmp_path))
    gen = torch.Generator().manual_seed(5)
    train = torch.zeros(300, 3, 5)
    train[..., :4] = (torch.rand(300, 3, 4, generator=gen) < 0.5).double()
    train[..., -1] = torch.rand(300, 3, generator=gen) * 10
    first = run_data.fitted_baselines(train)
    direct = fit_baselines(train)

    def refit(_):
        raise AssertionError("fitted again")

    monkeypatch.setattr(run_data, "fit_baselines", refit)
    again = run_data.fitted_baselines(train)
    for fitted in (first, again):
        assert fitted.grand_bundle_price == direct.grand_bundle_price
        assert fitted.uniform_price == direct.uniform_price
        assert torch.equal(fitted.item_prices, direct.item_prices)
        assert torch.equal(fitted.size_prices, direct.size_prices)
    with pytest.raises(AssertionError, match="fitted again"):
        run_data.fitted_baselines(train[:200])


# --------------------------------------------------------------------------- fast fits (issue 27)


def _specialists(n: int, m: int, seed: int) -> torch.Tensor:
    """W.p. ½ every singleton worth 1 (m atoms), else one uniform item worth 1.9: duplicates
    and exact ties everywhere (the suite's generator)."""
    return known.specialists(n, torch.Generator().manual_seed(seed), n_items=m)


FAST_CASES = {
    "random": lambda s: random_xor(300, 6, 4, seed=20 + s),
    "integer ties": lambda s: random_xor(300, 6, 4, seed=30 + s, integer=True),
    "duplicates": lambda s: random_xor(40, 5, 3, seed=40 + s, integer=True).repeat(5, 1, 1),
    "specialists": lambda s: _specialists(400, 8, seed=50 + s),
    "additive": lambda s: torch.rand(400, 3, generator=torch.Generator().manual_seed(60 + s)),
}


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("case", sorted(FAST_CASES))
def test_fast_fits_equal_the_direct_reference(case, seed):
    """Every fit equals the pre-issue-27 direct evaluation (every candidate over every
    bidder and atom, tests/baselines_reference.py) to float tolerance."""
    from tests import baselines_reference as ref

    train = FAST_CASES[case](seed)
    fast = fit_baselines(train)
    uniform = ref.fit_uniform_item_price(train)
    assert fast.grand_bundle_price == ref.fit_grand_bundle_price(train)
    assert fast.uniform_price == pytest.approx(uniform, rel=1e-12)
    assert torch.allclose(fast.item_prices, ref.fit_item_prices(train, start=uniform), rtol=1e-12)
    size = ref.fit_bundle_size_prices(train)
    assert torch.equal(fast.size_prices.isinf(), size.isinf())
    assert torch.allclose(fast.size_prices, size, rtol=1e-12)
    # the public one-baseline fits take the same path
    assert torch.allclose(fit_item_prices(train), fast.item_prices, rtol=1e-12)
    assert torch.allclose(fit_bundle_size_prices(train), fast.size_prices, rtol=1e-12)


def test_two_option_revenue_equals_a_direct_loop_with_ties():
    """The histogram scoring of a coordinate step against the rule applied per bidder and
    candidate, on integer utilities and a grid through them (ties at every candidate)."""
    from bundleflow.evaluation.fit_prices import _two_option_revenue

    g = torch.Generator().manual_seed(70)
    n = 400
    a = torch.randint(-3, 4, (n,), generator=g).double()
    a[:20] = -INF  # no option without the item
    c = torch.randint(-2, 8, (n,), generator=g).double()
    k0, k1 = torch.randint(0, 4, (n,), generator=g), torch.randint(0, 4, (n,), generator=g)
    pay_a, base = torch.rand(n, generator=g).double(), torch.rand(n, generator=g).double()
    weights = torch.randint(1, 4, (n,), generator=g).double()
    grid = torch.tensor([0.0, 0.5, 1.0, 2.0, 2.0, 3.0, 4.5, 6.0], dtype=torch.float64)
    fast = _two_option_revenue((a, k0, pay_a), (c, k1, base), grid, weights)
    for j, price in enumerate(grid.tolist()):
        total = 0.0
        for i in range(n):
            u = c[i].item() - price
            takes = u > a[i] or (u == a[i] and k1[i] < k0[i])
            best = u if takes else a[i].item()
            if best >= 0:
                total += weights[i].item() * (base[i].item() + price if takes else pay_a[i].item())
        assert fast[j].item() == pytest.approx(total, rel=1e-12, abs=1e-12)


def test_distinct_rows_and_their_counts():
    from bundleflow.evaluation.fit_prices import _distinct

    rows = random_xor(30, 4, 3, seed=71)
    order = torch.randperm(50, generator=torch.Generator().manual_seed(0))
    train = torch.cat([rows, rows[:10], rows[:10]])[order]  # 30 distinct rows, 10 thrice
    distinct, counts = _distinct(train)
    assert distinct.shape[0] == torch.unique(train.flatten(1), dim=0).shape[0]
    assert counts.sum() == 50 and counts.max() >= 3
    for row, count in zip(distinct, counts.tolist(), strict=True):
        assert (train == row).flatten(1).all(dim=1).sum() == count


def test_distinct_rows_inverse_rebuilds_every_row():
    from bundleflow.evaluation.fit_prices import distinct_rows

    rows = random_xor(30, 4, 3, seed=72)
    order = torch.randperm(50, generator=torch.Generator().manual_seed(1))
    test = torch.cat([rows, rows[:10], rows[:10]])[order]
    distinct, inverse = distinct_rows(test)
    assert distinct.shape[0] == 30 and torch.equal(distinct[inverse], test)
    assert distinct_rows(rows) is None  # nothing to merge: every row is scored


def test_scoring_identical_rows_once_equals_scoring_every_row():
    """The report scores each distinct test valuation once (specialists: 101 distinct among
    100,000); every baseline's per-row payments are those of the row-by-row outcomes."""
    rows = random_xor(40, 5, 4, seed=73)
    order = torch.randperm(100, generator=torch.Generator().manual_seed(2))
    test = torch.cat([rows, rows[:30], rows[:30]])[order]
    fitted = fit_baselines(rows)
    m = 5
    uniform = torch.full((m,), fitted.uniform_price, dtype=torch.float64)
    expected = {
        "grand_bundle": grand_bundle_payments(test.double(), fitted.grand_bundle_price),
        "uniform_item_price": item_price_outcome(test, uniform)[1],
        "item_pricing": item_price_outcome(test, fitted.item_prices)[1],
        "bundle_size_pricing": bundle_size_outcome(test, fitted.size_prices)[1],
        "upper_bound": test[..., -1].amax(dim=1).double(),
    }
    got = fitted.payments(test)
    assert set(got) == set(expected)
    for name, pay in expected.items():
        assert torch.equal(got[name], pay), name
    assert float(got["item_pricing"].sum()) > 0  # the baselines sell: the test can fail


def test_fallback_reuses_the_fitted_baselines(monkeypatch):
    """With the posted price beside a menu, the run fits the baselines once (the report's
    cached fit) and the fallback takes its prices from it."""
    from bundleflow.evaluation import baselines
    from bundleflow.evaluation.posted import fit_posted_prices

    train = random_xor(300, 6, 4, seed=72)
    fitted = fit_baselines(train)

    def refit(*_, **__):
        raise AssertionError("fitted again")

    monkeypatch.setattr(baselines, "fit_item_prices", refit)
    monkeypatch.setattr(baselines, "fit_bundle_size_prices", refit)
    posted, record = fit_posted_prices(train, "best", fitted)
    item = float(item_price_outcome(train, fitted.item_prices)[1].mean())
    assert record["train_revenue"]["item"] == item


@pytest.mark.parametrize("integer", [False, True])
def test_uniform_runs_equal_the_direct_rule(integer):
    """Uniform-price revenue from each bidder's runs of candidates equals the rule applied
    to every candidate, with sizes missing and candidates on exact crossings (ties)."""
    from bundleflow.evaluation.fit_prices import (
        _size_table,
        _uniform_revenue,
        _uniform_revenue_direct,
        _xor_sizes,
    )

    train = random_xor(400, 6, 5, seed=73, integer=integer)
    values, index, sizes = _size_table(*_xor_sizes(train))
    weights = torch.ones(values.shape[0], dtype=torch.float64)
    ratios = (values / sizes)[values > -INF]
    candidates = torch.cat([ratios[:40], torch.linspace(0.1, 3.0, 50, dtype=torch.float64)])
    candidates = candidates.unique()  # sorted, with exact walk-away crossings among them
    fast = _uniform_revenue((values, index, sizes), weights, candidates)
    direct = _uniform_revenue_direct(values, index, sizes.double(), weights, candidates)
    assert torch.allclose(fast, direct, rtol=1e-12, atol=1e-12)
