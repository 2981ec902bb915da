"""scripts/cats_menu_scaling.py: real finite menus on CATS bidders (BENCHMARKS.md, fifth
pass). The chunked hard rule against a brute-force one, ties and zero utility by hand, and
the tiered design's bundles against the cover model's sizes."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from bundleflow.evaluation.baselines import fit_bundle_size_prices
from bundleflow.valuations.xor import xor_value_bruteforce
from tests.conftest import REPO
from tests.test_cats_cover_model import _one_size_bidders


@pytest.fixture
def script(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "scripts"))  # it imports its sibling script
    spec = importlib.util.spec_from_file_location(
        "cats_menu_scaling", REPO / "scripts" / "cats_menu_scaling.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _brute_payments(bidders, bundles, prices):
    out = []
    for v in bidders:
        best, pay = 0.0, 0.0
        bought = False
        for b, p in zip(bundles, prices, strict=True):
            u = xor_value_bruteforce(v, b) - float(p)
            if u > best or (not bought and u >= best):
                best, pay, bought = u, float(p), True
        out.append(pay)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_chunked_play_equals_the_brute_force_hard_rule(script, chunk):
    g = torch.Generator().manual_seed(3)
    bidders = _one_size_bidders(40, 6, 3, seed=5)
    bundles = (torch.rand(11, 6, generator=g) < 0.6).float()
    prices = torch.rand(11, generator=g, dtype=torch.float64) * 4
    got = script.play(bidders, bundles, prices, chunk)
    assert torch.allclose(got, _brute_payments(bidders, bundles, prices), atol=1e-9)


def test_ties_go_to_the_earlier_element_and_zero_utility_buys(script):
    # one bidder: atom {0} worth 5, atom {0, 1} worth 6
    bidder = torch.tensor([[[1.0, 0.0, 5.0], [1.0, 1.0, 6.0]]])
    bundles = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    # utilities 3 and 3: the earlier element (price 2) is bought, in one chunk or two
    for chunk in (1, 2):
        pay = script.play(bidder, bundles, torch.tensor([2.0, 3.0], dtype=torch.float64), chunk)
        assert pay.tolist() == [2.0]
    # utility exactly 0 at the only affordable element: she buys (the hard rule's ≥ 0)
    pay = script.play(bidder, bundles, torch.tensor([5.0, 7.0], dtype=torch.float64), 1)
    assert pay.tolist() == [5.0]
    # nothing affordable: she walks away
    pay = script.play(bidder, bundles, torch.tensor([5.5, 7.0], dtype=torch.float64), 1)
    assert pay.tolist() == [0.0]


def test_tier_menu_draws_the_models_bundle_sizes_in_revenue_shares(script):
    bidders = _one_size_bidders(300, 8, 3, seed=11)
    model = script.CoverModel(bidders, fit_bundle_size_prices(bidders))
    predicted, sizes = model.best(500)
    bundles, tiers = script.tier_menu(model, 500, sizes, torch.Generator().manual_seed(0))
    assert 0.0 < predicted <= 1.0 + 1e-9
    assert abs(bundles.shape[0] - 500) <= 8  # each tier's count rounded
    for s in tiers.unique().tolist():
        rows = bundles[tiers == s]
        assert (rows.sum(dim=1) == sizes[s]).all()  # every bundle of tier s has size t_s
    share = torch.bincount(model.size, weights=model.bsp, minlength=model.m + 1)
    assert torch.equal(model.revenue_share()[1:], share[1:]) and model.revenue_share()[0] == 0
    big = int(share[1:].argmax()) + 1
    assert int((tiers == big).sum()) == round(500 * float(share[big] / share.sum()))


def test_polished_prices_earn_at_least_the_start_on_training(script):
    g = torch.Generator().manual_seed(8)
    train = _one_size_bidders(200, 6, 3, seed=9)
    bundles = (torch.rand(12, 6, generator=g) < 0.7).float()
    start = torch.rand(12, generator=g, dtype=torch.float64) * 6
    new = script.polished(train, bundles, start, rounds=2, chunk=5)
    before = script.play(train, bundles, start, 5).mean()
    after = script.play(train, bundles, new, 5).mean()
    # each accepted plateau move may give up its 1e-6 margin per buyer: J·rounds of them
    assert after >= before - 12 * 2 * 1e-6
    assert not torch.equal(new, start)  # 12 random prices are not already optimal


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_play_on_cuda_equals_the_cpu(script):
    g = torch.Generator().manual_seed(4)
    bidders = _one_size_bidders(64, 8, 3, seed=6)
    bundles = (torch.rand(40, 8, generator=g) < 0.6).float()
    prices = torch.rand(40, generator=g, dtype=torch.float64) * 5
    cpu = script.play(bidders, bundles, prices, 7)
    cuda = script.play(bidders.cuda(), bundles, prices, 7)
    assert torch.equal(cuda.cpu(), cpu)
