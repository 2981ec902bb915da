"""Known-optimum settings: every optimum and reference revenue checked against an independent
answer (a closed form, an exact rational computation, a grid search, or Monte Carlo on the
generator's own samples with a hand-written hard choice)."""

from __future__ import annotations

import heapq
import json
import math
from fractions import Fraction

import pytest
import torch

from bundleflow.cli.app import main
from bundleflow.evaluation.baselines import bundle_size_outcome, fit_bundle_size_prices
from bundleflow.train.config import DataConfig
from bundleflow.valuations import known as k
from bundleflow.valuations import known_data
from bundleflow.valuations.dataset import load_dataset
from bundleflow.valuations.known_families import (
    DDT_BOX,
    additive_ddt,
    additive_uniform,
    unit_demand,
)
from bundleflow.valuations.known_optima import (
    ADDITIVE_UNIFORM_OPTIMA,
    DDT_BEST_DETERMINISTIC,
    DDT_MENU,
    ddt_grand_bundle,
    manelli_vincent_m2,
    menu_revenue_2d,
    pavlov_optimum,
    single_price_unit_demand,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _bundle_values(vals: torch.Tensor, bundle: list[int]) -> torch.Tensor:
    """v(S) of XOR valuations ``[N, K, m+1]``: the best atom inside S (0 if none)."""
    m = vals.shape[2] - 1
    s = torch.zeros(m, dtype=torch.float64)
    s[bundle] = 1.0
    fits = (vals[..., :m].double() * (1 - s)).sum(-1) == 0  # (N, K)
    return torch.where(fits, vals[..., m].double(), 0.0).amax(dim=1)


def _menu_payments(vals: torch.Tensor, menu: list) -> torch.Tensor:
    """Hard choice of a menu of lotteries ``[([(prob, bundle), ...], price), ...]``: the best
    utility, ties to the first option, buy iff utility ≥ 0. Per-valuation payments ``[N]``."""
    utils, prices = [], []
    for lottery, price in menu:
        value = sum(p * _bundle_values(vals, b) for p, b in lottery)
        utils.append(value - price)
        prices.append(price)
    u = torch.stack(utils, dim=1)  # (N, options)
    best, choice = u.max(dim=1)
    return torch.where(best >= 0, torch.tensor(prices, dtype=torch.float64)[choice], 0.0)


def _close(payments: torch.Tensor, target: float, z: float = 4.0) -> None:
    mean = float(payments.mean())
    se = float(payments.std()) / math.sqrt(payments.numel())
    assert abs(mean - target) <= z * se + 1e-9, (mean, target, se)


# --------------------------------------------------------------------------- additive-ddt


def test_ddt_optimum_is_88_over_9_exactly():
    assert menu_revenue_2d(DDT_BOX, DDT_MENU) == Fraction(88, 9)
    assert k.make_setting("additive-ddt").optimum.optimum == pytest.approx(88 / 9, abs=1e-12)


def test_exact_revenue_matches_monte_carlo_on_generated_ddt():
    vals = additive_ddt(300_000, _gen(1))
    assert torch.allclose(vals[:, 2, 2], vals[:, 0, 2] + vals[:, 1, 2])  # b_{12} = v1 + v2
    ddt = [([(0.5, [1]), (0.5, [0, 1])], 8.0), ([(1.0, [0, 1])], 12.0)]  # ½ item 1, item 2
    _close(_menu_payments(vals, ddt), 88 / 9)
    det = [([(1.0, [1])], 5.488), ([(1.0, [0, 1])], 11.942)]
    exact = menu_revenue_2d(DDT_BOX, [((0, 1, 0), 5.488), ((1, 1, 0), 11.942)])
    _close(_menu_payments(vals, det), exact)


def test_ddt_reference_revenues():
    def det(p1, p2, p12):
        return menu_revenue_2d(DDT_BOX, [((1, 0, 0), p1), ((0, 1, 0), p2), ((1, 1, 0), p12)])

    grid = [(4 + 0.5 * i, 4 + 0.5 * j, 8 + 0.5 * m) for i in range(25) for j in range(7)
            for m in range(31)]  # fmt: skip
    best = 0.0
    for _, x in heapq.nlargest(3, ((det(*p), p) for p in grid)):
        for h in (0.1, 0.02, 0.004, 0.001):
            for _ in range(3):
                steps = (-1, 0, 1)
                cands = [(x[0] + h * a, x[1] + h * b, x[2] + h * c)
                         for a in steps for b in steps for c in steps]  # fmt: skip
                value, x = max((det(*c), c) for c in cands)
        best = max(best, value)
    assert best == pytest.approx(DDT_BEST_DETERMINISTIC, abs=2e-4)
    assert best < 88 / 9 - 0.07  # the lottery is worth ≈ 0.8%
    gb, price = ddt_grand_bundle()
    grid_gb = max(menu_revenue_2d(DDT_BOX, [((1, 1, 0), 8 + i / 500)]) for i in range(7500))
    assert gb == pytest.approx(grid_gb, abs=1e-5) and gb == pytest.approx(9.62685, abs=1e-5)
    # separate Myerson prices: item 1 at 8 (64/12), item 2 at its floor 4
    items = menu_revenue_2d(DDT_BOX, [((1, 0, 0), 8), ((0, 1, 0), 4), ((1, 1, 0), 12)])
    assert items == pytest.approx(28 / 3, abs=1e-12)


# --------------------------------------------------------------------------- unit-demand


def test_pavlov_u23_optimum_and_single_price():
    revenue, p, q = pavlov_optimum(2.0)
    assert revenue == pytest.approx(2.1331, abs=1e-4)
    assert p == pytest.approx(2.2817, abs=2e-4) and q == pytest.approx(2.1151, abs=2e-4)
    single, price = single_price_unit_demand(2.0)
    grid = max(x * (1 - (x - 2) ** 2) for x in (2 + i / 100_000 for i in range(100_001)))
    assert single == pytest.approx(grid, abs=1e-9) and price == pytest.approx(2.2153, abs=1e-4)
    assert single == pytest.approx(2.1126, abs=1e-4)
    assert revenue / single - 1 == pytest.approx(0.0097, abs=3e-4)  # the lottery's room
    vals = unit_demand(400_000, _gen(2))
    menu = [([(1.0, [0])], p), ([(1.0, [1])], p), ([(0.5, [0]), (0.5, [1])], q)]
    _close(_menu_payments(vals, menu), revenue)


def test_pavlov_u01_is_one_price_and_scales():
    opt = k.make_setting("unit-demand", low=0.0, high=1.0).optimum
    assert opt.optimum == pytest.approx(2 / (3 * math.sqrt(3)), abs=1e-7)  # 0.3849
    assert opt.extra["item_price"] == pytest.approx(1 / math.sqrt(3), abs=1e-4)
    assert opt.best_posted_price == pytest.approx(opt.optimum, abs=1e-7)
    scaled = k.make_setting("unit-demand", low=4.0, high=6.0).optimum
    assert scaled.optimum == pytest.approx(2 * pavlov_optimum(2.0)[0], abs=1e-9)


# --------------------------------------------------------------------------- additive-uniform


def test_manelli_vincent_and_xor_layout():
    assert manelli_vincent_m2() == pytest.approx(0.54920, abs=1e-5)
    vals = additive_uniform(200_000, _gen(3), n_items=2)
    assert vals.shape == (200_000, 3, 3)
    menu = [([(1.0, [0])], 2 / 3), ([(1.0, [1])], 2 / 3), ([(1.0, [0, 1])], (4 - 2**0.5) / 3)]
    _close(_menu_payments(vals, menu), manelli_vincent_m2())


@pytest.mark.parametrize("m", [3, pytest.param(4, marks=pytest.mark.slow)])
def test_published_optima_are_the_best_size_schedules(m):
    """Giannakopoulos–Koutsoupias: the optimum is a bundle-size schedule; fit one on 3·10⁴
    additive draws, score it on 10⁵ fresh XOR draws of the generator."""
    prices = fit_bundle_size_prices(torch.rand(30_000, m, generator=_gen(4)))
    vals = additive_uniform(100_000, _gen(5), n_items=m)
    sets = vals[0, :, :m]
    singles = vals[0, sets.sum(1) == 1, m]  # atoms {1}, {2}, {3}, ... in item order
    assert torch.allclose(vals[0, :, m], sets @ singles)  # b_S = Σ_{i∈S} v_i
    payments = bundle_size_outcome(vals, prices)[1].double()
    published = ADDITIVE_UNIFORM_OPTIMA[m]
    se = float(payments.std()) / math.sqrt(payments.numel())
    assert float(payments.mean()) == pytest.approx(published, abs=4 * se + 0.0005)


# --------------------------------------------------------------------------- specialists


@pytest.mark.parametrize("m", [2, 20])
def test_specialists_full_surplus_and_loss_leader(m):
    s = k.make_setting("specialists", n_items=m)
    assert s.optimum.optimum == pytest.approx(1.45)
    vals = s.sample(10_000, _gen(6))
    assert vals.shape == (10_000, m, m + 1)
    atoms = (vals[..., m] > 0).sum(1)
    assert set(atoms.unique().tolist()) == {1, m}
    high = float(torch.tensor(1.9, dtype=torch.float32))  # the stored value
    optimal = [([(0.5, [0]), (0.5, [1])], 1.0), *[([(1.0, [i])], high) for i in range(m)]]
    pay = _menu_payments(vals, optimal)
    assert torch.allclose(pay, vals[..., m].double().amax(1))  # every bidder pays its value
    _close(pay, 1.45)
    leader = 0.5 + 0.5 * (1 / m + 1.9 * (m - 1) / m)
    assert s.optimum.best_posted_price == pytest.approx(leader)
    item_pricing = [([(1.0, [0])], 1.0), *[([(1.0, [i])], high) for i in range(1, m)]]
    _close(_menu_payments(vals, item_pricing), leader)
    # item pricings with j items at 1 and the rest at 1.9 (or all at 1.9): j = 1 is best
    others = [0.5 + 0.5 * (j / m + 1.9 * (1 - j / m)) for j in range(2, m + 1)] + [0.95]
    assert leader > max(others)
    assert leader == pytest.approx({2: 1.225, 20: 1.4275}[m])


# --------------------------------------------------------------------------- catalogue


def test_catalogue_structure_and_optimum():
    s = k.make_setting("catalogue", n_items=20, catalogue_size=60, synergy_max=8.0)
    cat = s.catalogue
    sets = [frozenset(row.nonzero().squeeze(1).tolist()) for row in cat.bundles]
    assert all(3 <= len(g) <= 5 for g in sets) and len(set(sets)) == 60
    assert not any(a <= b for i, a in enumerate(sets) for j, b in enumerate(sets) if i != j)
    assert ((cat.item_values >= 1) & (cat.item_values <= 2)).all()
    assert ((cat.synergy >= 1) & (cat.synergy <= 8)).all()
    assert torch.allclose(cat.weights, cat.bundles.double() @ cat.item_values * cat.synergy)
    assert s.optimum.optimum == pytest.approx(float(cat.weights.mean()) / 4)
    again = k.make_setting("catalogue", n_items=20, catalogue_size=60, synergy_max=8.0)
    assert torch.equal(again.catalogue.weights, cat.weights)  # from catalogue_seed only
    other = k.make_setting("catalogue", n_items=20, catalogue_size=60, catalogue_seed=1)
    assert not torch.equal(other.catalogue.bundles, cat.bundles)
    vals = s.sample(30_000, _gen(7))
    menu = [([(1.0, sorted(g))], float(w) / 2) for g, w in zip(sets, cat.weights, strict=True)]
    _close(_menu_payments(vals, menu), s.optimum.optimum)
    # per bundle, w/2 is the best price of U[0, w]: p(1 − p/w) on a grid
    w = float(cat.weights[0])
    best = max((w * i / 1000) * (1 - i / 1000) for i in range(1001))
    assert best == pytest.approx(w / 4)


# --------------------------------------------------------------------------- files, config, CLI


def test_known_dataset_records_optimum_and_split(tmp_path):
    s = k.make_setting("unit-demand")
    sizes = {"train": 300, "val": 50, "test": 700}
    path = known_data.generate_known_dataset(tmp_path / "u.safetensors", s, sizes, seed=4)
    data = load_dataset(path)
    assert data.split.sizes() == sizes
    assert data.metadata["known"]["optimum"] == pytest.approx(s.optimum.optimum)
    assert data.metadata["known"]["setting"] == "unit-demand"
    bigger = {**sizes, "test": 2000}
    path2 = known_data.generate_known_dataset(tmp_path / "u2.safetensors", s, bigger, seed=4)
    data2 = load_dataset(path2)
    assert torch.equal(data2.part("train"), data.part("train"))  # own stream per part
    assert torch.equal(data2.part("test")[:700], data.part("test"))


def test_config_known_kind_loads_with_optimum(tmp_path, monkeypatch):
    from bundleflow.train.data import load_run_data

    monkeypatch.setenv("BUNDLEFLOW_CACHE", str(tmp_path))
    cfg = DataConfig(
        kind="known", setting="specialists", n_items=5, n_samples=400,
        known_val_samples=60, known_test_samples=500, seed=2,
    )  # fmt: skip
    data = load_run_data(cfg, torch.device("cpu"))
    assert data.test.shape == (500, 5, 6) and data.n_items == 5
    assert data.info["known"]["optimum"] == pytest.approx(1.45)
    assert data.info["known"]["best_posted_price"] == pytest.approx(0.5 + 0.5 * (0.2 + 1.9 * 0.8))
    additive = load_run_data(
        DataConfig(kind="additive", n_items=2, additive_val_samples=10, additive_test_samples=10),
        torch.device("cpu"),
    )
    assert additive.info["known"]["optimum"] == pytest.approx(0.5492, abs=1e-4)


def test_cli_generate_setting(tmp_path, capsys):
    out = tmp_path / "c.safetensors"
    argv = ["data", "generate", "--setting", "catalogue", "--items", "20", "--n", "100",
            "--val-n", "20", "--test-n", "300", "--seed", "1", "--catalogue-size", "30",
            "--synergy-max", "8", "--out", str(out), "--json"]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    expected = k.make_setting("catalogue", n_items=20, catalogue_size=30, synergy_max=8.0)
    assert result["optimum"] == pytest.approx(expected.optimum.optimum)
    assert result["split"] == {"train": 100, "val": 20, "test": 300}
    meta = load_dataset(out).metadata
    assert meta["regenerate"].startswith("bundleflow data generate --setting catalogue")
    assert main([*argv[:3], "unit-demand", "--items", "3", *argv[6:]]) == 2  # m is 2
