"""Issue 27: menus that can learn lotteries — learned odds, pair lotteries, the posted-price
start, the polish's near-neutral moves — each against a hand-computed answer."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from bundleflow.evaluation.mechanism import FrozenMechanism
from bundleflow.evaluation.posted import PostedPrices
from bundleflow.maths.flow import VelocityField
from bundleflow.maths.menu import Menu
from bundleflow.maths.polish import hard_revenue_of, polish_prices
from bundleflow.train.menu_init import atom_pairs, price_at_fallback
from tests.conftest import isolated_bundleflow_home, run_cli


def identity_flow(m: int) -> VelocityField:
    """A flow whose Q is 0: z_N = z0, so a support point's bundle is round(μ)."""
    flow = VelocityField(m, hidden=8)
    with torch.no_grad():
        flow.fc3.weight.zero_()
        flow.fc3.bias.zero_()
    return flow.eval()


def corner_menu(corners: torch.Tensor, **kw) -> Menu:
    """A menu whose support points sit on the 0/1 ``corners [J, D, m]``."""
    J, D, m = corners.shape
    menu = Menu(m, J, D, generator=torch.Generator().manual_seed(0), **kw)
    with torch.no_grad():
        menu.means.copy_(3.0 * (2 * corners - 1))  # μ = 0.05 + 0.9·sigmoid(±30): ≈ 0.05 / 0.95
    return menu


def test_density_weights_lock_elements_to_one_point_and_mixture_weights_are_the_odds():
    # The reference's α: at m=20 most elements put > 99% on one support point whatever w is
    # (the fixed random σ makes log N differ by tens of nats between points).
    m, J, D = 20, 400, 8
    flow = identity_flow(m)
    menu = Menu(m, J, D, generator=torch.Generator().manual_seed(1))
    alpha = menu.lotteries(flow, 1.0, generator=torch.Generator().manual_seed(2)).alpha
    assert float((alpha.max(dim=1).values > 0.99).float().mean()) > 0.7
    # Mixture weights: α = softmax(w) exactly, whatever the noise, and w gets a gradient.
    menu.lottery_weights = "mixture"
    with torch.no_grad():
        menu.logits.copy_(torch.randn(J, D, generator=torch.Generator().manual_seed(3)))
    lot = menu.lotteries(flow, 1.0, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(lot.alpha, torch.softmax(menu.logits, dim=1))
    (lot.alpha[:, 0]).sum().backward()
    assert menu.logits.grad is not None and float(menu.logits.grad.abs().sum()) > 0


def test_atom_pairs_put_half_the_points_on_each_of_two_distinct_atoms():
    atoms = torch.eye(4)  # four singleton atoms
    cfg = SimpleNamespace(size=50, support=6)
    corners = atom_pairs(atoms, cfg, 4, torch.Generator().manual_seed(0))
    assert corners.shape == (46, 6, 4)
    first, second = corners[:, :3], corners[:, 3:]
    assert torch.equal(first, first[:, :1].expand_as(first))  # one atom on points 0..2
    assert torch.equal(second, second[:, :1].expand_as(second))  # another on 3..5
    assert bool((first[:, 0] != second[:, 0]).any(dim=-1).all())  # never the same atom
    assert torch.equal(corners.sum(dim=-1), torch.ones(46, 6))  # each point one singleton


@pytest.mark.parametrize(("rule", "lottery_price"), [("expected", 1.45), ("cheapest", 1.0)])
def test_a_lottery_starts_at_its_expected_or_cheapest_posted_price(rule, lottery_price):
    # Item prices (1, 1.9): item 1 is the loss leader. Elements: item 1, item 2, and the
    # even lottery over both (mixture odds 1/2 each).
    corners = torch.tensor(
        [[[1.0, 0.0]] * 2, [[0.0, 1.0]] * 2, [[1.0, 0.0], [0.0, 1.0]]]
    )  # (J=3, D=2, m=2)
    menu = corner_menu(corners)
    menu.lottery_weights = "mixture"
    with torch.no_grad():
        menu.logits.zero_()
    posted = PostedPrices(item_prices=torch.tensor([1.0, 1.9]))
    eps = torch.zeros(corners.shape)
    price_at_fallback(menu, identity_flow(2), posted, 1.0, eps, rule)
    torch.testing.assert_close(menu.prices.detach(), torch.tensor([1.0, 1.9, lottery_price]))


# Specialists + flexible on two items, by hand: two specialists value each item at 1, one
# flexible bidder wants item 1 at 1.9, another item 2 at 1.9. Elements: item 1, item 2, the
# even lottery over both. Columns: each element's expected value to each bidder.
VALUES = torch.tensor(
    [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.9, 0.0, 0.95], [0.0, 1.9, 0.95]], dtype=torch.float64
)
NONE = (torch.full((4,), -torch.inf, dtype=torch.float64), torch.zeros(4, dtype=torch.float64))


def test_the_loss_leader_trap_and_the_plateau_move_that_leaves_it():
    # Start: the posted prices (item 1 at 1, item 2 at 1.9) and the lottery at its expected
    # price 1.45. Mean revenue (1 + 1 + 1 + 1.9)/4 = 1.225; the optimum (lottery at 1, items
    # at 1.9) is (1 + 1 + 1.9 + 1.9)/4 = 1.45, the full surplus. No single price change
    # gains: cutting the lottery to 1 moves the specialists off item 1 at the same payment;
    # raising item 1 loses them.
    start = torch.tensor([1.0, 1.9, 1.45], dtype=torch.float64)
    assert hard_revenue_of(VALUES, start, *NONE) == pytest.approx(1.225)
    gen = torch.Generator().manual_seed(0)
    stuck = polish_prices(VALUES, start, *NONE, rounds=5, generator=gen)
    assert stuck.train_revenue[-1] == pytest.approx(1.225)
    gen = torch.Generator().manual_seed(0)
    moved = polish_prices(VALUES, start, *NONE, rounds=5, generator=gen, plateau=True)
    assert max(moved.train_revenue) == pytest.approx(1.45, abs=1e-5)
    assert moved.prices[2] == pytest.approx(1.0, abs=1e-5)  # the lottery at the specialists' 1
    assert float(moved.prices[0]) >= 1.9 - 1e-5  # item 1 no longer a loss leader


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    yield from isolated_bundleflow_home(tmp_path_factory, "lottery")


def test_a_run_with_the_known_optimum_recipe_offers_no_fallback_and_keeps_its_polish(home):
    # tiny, with the recipe's keys: the fitted schedule prices the start but is not offered,
    # and the polish's kept round never has a lower validation revenue than round 0.
    out = run_cli(
        "train", "--preset", "tiny", "--no-progress",
        "--set", "menu.lottery_weights=mixture", "--set", "menu.init_bundles=atom_pairs",
        "--set", "menu.fallback=best", "--set", "menu.posted_price_init=true",
        "--set", "menu.offer_fallback=false", "--set", "stage2.polish_rounds=2",
        cwd=home,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "kernels plain (menu.lottery_weights=mixture)" in out.stderr
    assert "the fallback is not offered" in out.stderr
    run_dir = next((home / "home" / "runs").glob("tiny-*"))
    mech = FrozenMechanism.load(run_dir / "mechanism.safetensors")
    assert mech.fallback is None
    polish = mech.meta["polish"]
    assert polish["val_revenue"][polish["round_kept"]] >= polish["val_revenue"][0]
    report = json.loads((run_dir / "report.json").read_text())
    assert report["ir_violations"] == 0


def test_offer_fallback_false_needs_a_fallback(home):
    out = run_cli("config", "--preset", "tiny", "--set", "menu.offer_fallback=false", cwd=home)
    assert out.returncode == 2
    assert "menu.offer_fallback" in out.stderr


def test_the_summary_says_plainly_whether_learned_elements_are_bought():
    from bundleflow.evaluation.report import learned_line

    tie = {
        "buy_rate": 0.9, "elements_in_use": 0, "menu_size": 1000,
        "fallback": {"kind": "size", "chosen_fraction": 0.9, "revenue_share": 1.0},
        "best_baseline": "bundle_size_pricing",
        "ratio_to_best_baseline": {"ratio": 1.0, "ci95": [1.0, 1.0]},
    }  # fmt: skip
    line = learned_line(tie)
    assert line.startswith("learned elements: none bought; the mechanism is the fallback's size")
    assert "1x the best posted price (bundle-size pricing" in line
    gain = {
        "buy_rate": 0.95, "elements_in_use": 21, "menu_size": 1000,
        "best_baseline": "item_pricing",
        "ratio_to_best_baseline": {"ratio": 1.016, "ci95": [1.015, 1.017]},
    }  # fmt: skip
    line = learned_line(gain)
    assert "bought by 95.0% of test bidders (21 of 1000 elements), 100.0% of the revenue" in line
    assert "1.016x the best posted price (item pricing" in line


def test_the_polish_reads_element_values_exactly_not_as_float32_utilities_plus_prices():
    """A ½–½ lottery over items 1 and 2 (values 1.9 and 1.0 as XOR atoms) is worth exactly
    1.45 to the bidder. Read as float32 utility + price at a price of 1234.567, it is off by
    ~6e-5 — far above the polish's 1e-6 margin, which is how stored prices once played at
    0.54 of the specialists' optimum against 1.0 in the polish."""
    from bundleflow.train.finish import _outcome_columns

    bundles = torch.tensor([[[1, 0], [0, 1]]], dtype=torch.uint8)  # (J=1, D=2, m=2)
    mech = FrozenMechanism(bundles, torch.tensor([[0.5, 0.5]]), torch.tensor([1234.567]),
                           torch.zeros(1, 2, 2), mix_temp=1.0)  # fmt: skip
    vals = torch.tensor([[[1.0, 0.0, 1.9], [0.0, 1.0, 1.0]]])  # (B=1, K=2, m+1)
    values, fb_u, _ = _outcome_columns(mech, vals, 16)
    exact = 0.5 * float(torch.tensor(1.9)) + 0.5 * 1.0  # the float32 value of 1.9, summed in f64
    assert values.dtype == torch.float64 and float(values[0, 0]) == exact
    old = float(mech.utilities(vals)[0, 0].double() + mech.prices.double()[0])
    assert abs(old - exact) > 1e-6  # the old reading: the error the margin could not absorb
    assert fb_u[0] == float("-inf")
