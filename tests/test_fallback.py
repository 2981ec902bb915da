"""The menu extended by a posted-price option (``menu.fallback``): hand-computed auctions,
soft revenue against a direct sum, the saved mechanism against a brute-force loop, the
sharded soft revenue against one process, and the trainer end to end.

The hand-computed auction is the one of ``test_revenue`` (items a, b; J = 3):
  e0: {a} price 3, e1: {a,b} price 5, e2: ½{b} + ½{a,b} price 4
  v1: {a}:4, {a,b}:6   menu u = (1, 1, −1)
  v2: {b}:1            menu u = (−3, −4, −3)
  v3: {a,b}:9, {b}:8   menu u = (−3, 4, 4.5)
  v4: {a}:3            menu u = (0, −2, −2.5)
Fallback, item prices (2, 3): u_fb = (2, −2, 5, 1), payments (2, 3, 3, 2):
  v1, v3, v4 buy at the posted prices (option 3), v2 walks away: revenue (2+0+3+2)/4.
Fallback, item prices (3, 4): u_fb = (1, −3, 4, 0): v1 ties e0 and e1 (→ e0), v4 ties e0
  (→ e0), v3 prefers e2: the menu's outcome, revenue 2.5.
Fallback, effective size prices (0, 3.5, 5): u_fb = (1, −2.5, 4.5, −0.5): v1 ties e0, v3
  ties e2 (4.5): the elements win both ties; revenue 2.5.
"""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import pytest
import torch

from bundleflow.cli.app import main
from bundleflow.errors import BundleflowError
from bundleflow.evaluation import baselines
from bundleflow.evaluation.evaluate import evaluate_mechanism
from bundleflow.evaluation.mechanism import FrozenMechanism
from bundleflow.evaluation.posted import PostedPrices, fit_posted_prices
from bundleflow.maths.flow import VelocityField
from bundleflow.maths.menu import Menu, freeze_flow, lottery_utilities
from bundleflow.maths.revenue import WALK_AWAY, hard_outcome, sharded_soft_revenue, soft_revenue
from bundleflow.system.distributed import Comm
from bundleflow.train.config import load_config, parse_set
from bundleflow.train.stage2_step import stage2_loss
from bundleflow.valuations.io import load_dataset
from tests.conftest import isolated_bundleflow_home
from tests.test_revenue import ALPHA, BUNDLES, PRICES, VALUATIONS
from tests.test_trainer import CPU_ARGS, _only_run, _sets, _xor_value

INF = math.inf


def hand_mechanism(fallback: PostedPrices | None) -> FrozenMechanism:
    return FrozenMechanism(
        bundles=BUNDLES.to(torch.uint8),
        alpha=ALPHA,
        prices=PRICES,
        eps=torch.zeros(BUNDLES.shape),
        mix_temp=1.0,
        fallback=fallback,
    )


# --------------------------------------------------------------------------- hand-computed


@pytest.mark.parametrize(
    ("fallback", "u_fb", "choice", "payment"),
    [
        (PostedPrices(item_prices=torch.tensor([2.0, 3.0])), [2, -2, 5, 1], [3, -1, 3, 3],
         [2, 0, 3, 2]),
        (PostedPrices(item_prices=torch.tensor([3.0, 4.0])), [1, -3, 4, 0], [0, -1, 2, 0],
         [3, 0, 4, 3]),
        (PostedPrices(size_prices=torch.tensor([0.0, 3.5, 5.0])), [1, -2.5, 4.5, -0.5],
         [0, -1, 2, 0], [3, 0, 4, 3]),
    ],
)  # fmt: skip
def test_hand_computed_auction_with_a_fallback(fallback, u_fb, choice, payment):
    utility, _ = fallback.outcome(VALUATIONS)
    assert utility.tolist() == u_fb
    mech = hand_mechanism(fallback)
    got_choice, got_pay, realised = mech.play(VALUATIONS)
    assert got_choice.tolist() == choice
    assert got_pay.tolist() == payment
    assert mech.revenue(VALUATIONS) == pytest.approx(sum(payment) / 4)
    assert bool((realised >= 0).all())  # IR
    # the same through hard_outcome with the option as an extra column
    u = lottery_utilities(BUNDLES, ALPHA, PRICES, VALUATIONS)
    assert hard_outcome(u, PRICES, fallback.outcome(VALUATIONS))[0].tolist() == choice


def test_fallback_ties_go_to_the_element_and_all_negative_walks_away():
    u = torch.tensor([[1.0, 2.0], [3.0, 1.0], [-1.0, -2.0], [0.5, 0.2], [-1.0, -1.0]])
    prices = torch.tensor([10.0, 20.0])
    extra_u = torch.tensor([2.0, 4.0, -0.5, -INF, 0.0])
    extra_pay = torch.tensor([7.0, 8.0, 9.0, 0.0, 6.0])
    choice, payment = hard_outcome(u, prices, (extra_u, extra_pay))
    assert choice.tolist() == [1, 2, WALK_AWAY, 0, 2]  # tie → element; −inf: not offered
    assert payment.tolist() == [20.0, 8.0, 0.0, 10.0, 6.0]  # u_fb = 0 ≥ 0 buys
    # without the option: the old outcome, unchanged
    assert hard_outcome(u, prices)[0].tolist() == [1, 0, WALK_AWAY, 0, WALK_AWAY]


def test_posted_prices_by_hand_xor_and_additive():
    # m = 3; atoms {0}:5 and {1,2}:9 and a padding row
    v = torch.tensor([[[1.0, 0, 0, 5], [0, 1, 1, 9], [0, 0, 0, 0]]])
    item = PostedPrices(item_prices=torch.tensor([2.0, 3.0, 4.0]))  # u = 3, 2
    size = PostedPrices(size_prices=torch.tensor([0.0, 4.0, 6.0, INF]))  # u = 1, 3
    both = PostedPrices(item_prices=item.item_prices, size_prices=size.size_prices)
    assert [t.tolist() for t in item.outcome(v)] == [[3.0], [2.0]]
    assert [t.tolist() for t in size.outcome(v)] == [[3.0], [6.0]]
    assert [t.tolist() for t in both.outcome(v)] == [[3.0], [2.0]]  # tie: item prices
    assert both.kind == "item+size" and item.kind == "item"
    # only sizes not for sale, or no atom at all: the option does not exist (payment 0)
    big = torch.tensor([[[1.0, 1, 1, 9], [0, 0, 0, 0]], [[0, 0, 0, 0], [0, 0, 0, 0]]])
    assert [t.tolist() for t in size.outcome(big)] == [[-INF, -INF], [0.0, 0.0]]
    # additive: items bought iff v_i ≥ p_i; sizes: the top-s items
    add = torch.tensor([[0.625, 0.25, 0.875], [0.125, 0.125, 0.125]])
    add_item = PostedPrices(item_prices=torch.tensor([0.5, 0.5, 0.5]))
    assert [t.tolist() for t in add_item.outcome(add)] == [[0.5, -INF], [1.0, 0.0]]
    add_size = PostedPrices(size_prices=torch.tensor([0.0, 0.75, 1.25, 2.0]))
    u, pay = add_size.outcome(add[:1])  # top sums 0.875, 1.5, 1.75 -> u .125, .25, −.25
    assert u.tolist() == [0.25] and pay.tolist() == [1.25]
    # bundle costs: p·S, or the effective price of |S| (the largest finite one below)
    bundles = torch.tensor([[1.0, 1, 0], [1, 1, 1], [0, 0, 0]])
    assert item.bundle_cost(bundles).tolist() == [5.0, 9.0, 0.0]
    assert size.bundle_cost(bundles).tolist() == [6.0, 6.0, 0.0]
    assert both.bundle_cost(bundles).tolist() == [5.0, 6.0, 0.0]


def _xor_sample(n: int, m: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    v = torch.zeros(n, 4, m + 1)
    v[..., :m] = (torch.rand(n, 4, m, generator=gen) < 0.35).float()
    v[:, 3, :m] = 0  # one padding row
    v[..., m] = torch.rand(n, 4, generator=gen) * 10 * v[..., :m].sum(dim=-1)
    return v


def test_option_pays_what_the_baselines_charge():
    """The fallback column is the fitted baseline itself: same payments on held-out data."""
    train, test = _xor_sample(400, 5, 0), _xor_sample(300, 5, 1)
    item_q = baselines.fit_item_prices(train)
    size_q = baselines.fit_bundle_size_prices(train)
    item = PostedPrices(item_prices=item_q)
    size = PostedPrices(size_prices=baselines.effective_size_prices(size_q))
    for posted, (_, expected) in (
        (item, baselines.item_price_outcome(test, item_q)),
        (size, baselines.bundle_size_outcome(test, size_q)),
    ):
        u, pay = posted.outcome(test.double())
        # same purchases; the cost p·T summed in another order (matmul there)
        assert torch.allclose(torch.where(u >= 0, pay, 0.0), expected, rtol=1e-12, atol=0)
    posted, record = fit_posted_prices(train, "best")
    revenue = record["train_revenue"]
    assert record["kind"] == max(revenue, key=revenue.get) and set(revenue) == {"item", "size"}
    with pytest.raises(ValueError, match="kind"):
        fit_posted_prices(train, "grand")


# --------------------------------------------------------------------------- soft revenue


def test_soft_revenue_with_an_extra_column_against_a_direct_sum():
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    p = torch.rand(5, generator=gen, dtype=torch.float64) * 3
    extra_u = torch.randn(6, generator=gen, dtype=torch.float64)
    extra_u[2] = -INF  # not offered to bidder 2
    extra_pay = torch.rand(6, generator=gen, dtype=torch.float64) * 3
    lam = 1.7
    total = 0.0
    for b in range(6):
        weights = [math.exp(lam * float(u[b, j])) for j in range(5)]
        w_x = math.exp(lam * float(extra_u[b])) if extra_u[b] > -INF else 0.0
        den = sum(weights) + w_x + 1.0  # 1.0: the walk-away column e^0
        total += (
            sum(w * float(p[j]) for j, w in enumerate(weights)) + w_x * float(extra_pay[b])
        ) / den
    got = soft_revenue(u, p, lam, (extra_u, extra_pay))
    assert float(got) == pytest.approx(total / 6, rel=1e-12)
    # an option nobody can take leaves the reference value
    none = (torch.full((6,), -INF, dtype=torch.float64), extra_pay)
    assert float(soft_revenue(u, p, lam, none)) == pytest.approx(float(soft_revenue(u, p, lam)))


class ThreadComm(Comm):
    """A fake ``world``-rank communicator: one thread per rank, all_reduce over a list."""

    def __init__(self, rank: int, world: int, shared: dict):
        object.__setattr__(self, "rank", rank)
        object.__setattr__(self, "world", world)
        object.__setattr__(self, "shared", shared)

    def all_reduce(self, tensor, op="sum"):
        slots, barrier = self.shared["slots"], self.shared["barrier"]
        slots[self.rank] = tensor.clone()
        barrier.wait()
        stacked = torch.stack(slots)
        reduced = stacked.amax(dim=0) if op == "max" else stacked.sum(dim=0)
        barrier.wait()  # everyone has read the slots before the next call writes them
        tensor.copy_(reduced)
        return tensor


def test_sharded_soft_revenue_with_a_fallback_equals_one_process():
    gen = torch.Generator().manual_seed(1)
    B, J, lam = 8, 7, 2.5
    u = torch.randn(B, J, generator=gen, dtype=torch.float64)
    p = torch.rand(J, generator=gen, dtype=torch.float64) * 2
    extra = (
        torch.randn(B, generator=gen, dtype=torch.float64) + 1,
        torch.rand(B, dtype=torch.float64),
    )
    extra[0][3] = -INF
    u_one, p_one = u.clone().requires_grad_(), p.clone().requires_grad_()
    single = soft_revenue(u_one, p_one, lam, extra)
    single.backward()
    world = 2
    shared = {"slots": [None] * world, "barrier": threading.Barrier(world)}
    results: dict[int, tuple] = {}

    def rank_main(rank: int) -> None:
        comm = ThreadComm(rank, world, shared)
        lo, hi = comm.shard(J)
        u_r = u[:, lo:hi].clone().requires_grad_()
        p_r = p[lo:hi].clone().requires_grad_()
        surrogate, revenue = sharded_soft_revenue(u_r, p_r, lam, comm.all_reduce, extra)
        surrogate.backward()
        results[rank] = (revenue.detach(), u_r.grad, p_r.grad)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for rank in range(world):
        assert float(results[rank][0]) == pytest.approx(float(single.detach()), rel=1e-12)
    assert torch.allclose(torch.cat([results[r][1] for r in range(world)], 1), u_one.grad)
    assert torch.allclose(torch.cat([results[r][2] for r in range(world)]), p_one.grad)


def test_stage2_loss_includes_the_fallback_column():
    m, J, D = 5, 6, 3
    gen = torch.Generator().manual_seed(2)
    flow = freeze_flow(VelocityField(m, hidden=16))
    menu = Menu(m, J, D, price_scale=3.0, generator=gen)
    vals = _xor_sample(16, m, 3)
    eps = menu.draw_noise(gen)
    posted = PostedPrices(item_prices=torch.full((m,), 2.0))
    loss, _ = stage2_loss(menu, flow, vals, 0.9, 0.1, eps, posted=posted)
    with torch.no_grad():
        u = menu.utilities(menu.lotteries(flow, 0.1, eps=eps), vals)
    expected = soft_revenue(u, menu.prices.detach(), 0.9, posted.outcome(vals))
    assert float(loss.detach()) == pytest.approx(-float(expected), rel=1e-6)
    loss_plain, _ = stage2_loss(menu, flow, vals, 0.9, 0.1, eps)
    plain_expected = -float(soft_revenue(u, menu.prices.detach(), 0.9))
    assert float(loss_plain.detach()) == pytest.approx(plain_expected, rel=1e-6)
    assert float(loss.detach()) != float(loss_plain.detach())


# --------------------------------------------------------------------------- the saved mechanism


def _brute_force(mech: FrozenMechanism, valuations: torch.Tensor) -> tuple[list, list]:
    """Choice and payment per valuation, one element and one atom at a time (float64)."""
    J, D, _ = mech.bundles.shape
    item = mech.fallback.item_prices.tolist() if mech.fallback.item_prices is not None else None
    size = mech.fallback.size_prices.tolist() if mech.fallback.size_prices is not None else None
    choices, payments = [], []
    for valuation in valuations:
        options = []
        for j in range(J):
            value = sum(
                float(mech.alpha[j, d]) * _xor_value(valuation, mech.bundles[j, d].tolist())
                for d in range(D)
            )
            options.append((value - float(mech.prices[j]), float(mech.prices[j])))
        best_fb = (-INF, 0.0)
        for row in valuation.tolist():
            atom, b = row[:-1], row[-1]
            if sum(atom) == 0:
                continue
            costs = []
            if item is not None:
                costs.append(sum(p for p, t in zip(item, atom, strict=True) if t))
            if size is not None:
                costs.append(size[int(sum(atom))])
            cost = min(costs)
            if b - cost > best_fb[0]:
                best_fb = (b - cost, cost)
        options.append(best_fb)
        best = max(u for u, _ in options)
        first = next(k for k, (u, _) in enumerate(options) if u == best)
        choices.append(first if best >= 0 else WALK_AWAY)
        payments.append(options[first][1] if best >= 0 else 0.0)
    return choices, payments


@pytest.mark.parametrize("kind", ["item", "size"])
def test_saved_mechanism_with_a_fallback_against_a_brute_force_loop(tmp_path, kind):
    m, J, D = 5, 8, 3
    gen = torch.Generator().manual_seed(4)
    flow = freeze_flow(VelocityField(m, hidden=16))
    menu = Menu(m, J, D, generator=gen)
    train, test = _xor_sample(300, m, 5), _xor_sample(200, m, 6)
    posted, _ = fit_posted_prices(train, kind)
    with torch.no_grad():  # elements priced like the posted prices, ± noise: both get chosen
        lot = menu.lotteries(flow, 0.2, eps=menu.draw_noise(gen))
        cost = posted.to(dtype=torch.float32).bundle_cost(lot.bundles)
        menu.prices.copy_((lot.alpha * cost).sum(-1) * (0.6 + 0.8 * torch.rand(J, generator=gen)))
    mech = FrozenMechanism.freeze(
        menu, flow, 0.2, eps=menu.draw_noise(gen), money_scale=1.0, fallback=posted
    )
    path = tmp_path / "mech.safetensors"
    mech.save(path)
    back = FrozenMechanism.load(path)
    assert back.fallback is not None and back.fallback.kind == kind
    choice, payment, realised = back.play(test, batch_size=37)
    brute_choice, brute_pay = _brute_force(back, test)
    assert choice.tolist() == brute_choice
    assert (choice == J).any() and ((choice >= 0) & (choice < J)).any()
    assert back.revenue(test) == pytest.approx(sum(brute_pay) / len(brute_pay), rel=1e-6)
    assert int(((realised < 0) & (choice != WALK_AWAY)).sum()) == 0
    report = evaluate_mechanism(back, test, train, batch_size=64)
    assert report["ir_violations"] == 0
    assert report["fallback"]["chosen_fraction"] == pytest.approx(
        float((choice == J).double().mean())
    )
    assert len(report["menu"]["purchases"]) == J
    assert report["elements_in_use"] == len(set(c for c in brute_choice if 0 <= c < J))


def test_load_validates_the_fallback_and_reads_old_files(tmp_path):
    mech = hand_mechanism(PostedPrices(size_prices=torch.tensor([0.0, 3.5, INF])))
    mech.save(tmp_path / "ok.safetensors")
    back = FrozenMechanism.load(tmp_path / "ok.safetensors")
    assert back.fallback.size_prices.tolist() == [0.0, 3.5, INF]
    hand_mechanism(None).save(tmp_path / "plain.safetensors")
    assert FrozenMechanism.load(tmp_path / "plain.safetensors").fallback is None
    bad = {
        "shape": PostedPrices(item_prices=torch.tensor([1.0, 2.0, 3.0])),
        "negative": PostedPrices(item_prices=torch.tensor([1.0, -2.0])),
        "infinite": PostedPrices(item_prices=torch.tensor([1.0, INF])),
        "decreasing": PostedPrices(size_prices=torch.tensor([0.0, 4.0, 3.0])),
        "nan": PostedPrices(size_prices=torch.tensor([0.0, math.nan, 3.0])),
    }
    for name, posted in bad.items():
        path = tmp_path / f"{name}.safetensors"
        hand_mechanism(posted).save(path)
        with pytest.raises(BundleflowError, match="fallback"):
            FrozenMechanism.load(path)


def test_config_keys():
    assert load_config(None).menu.fallback == "none"
    assert load_config("paper-m50").menu.fallback == "none"  # the faithful preset
    assert load_config(None, parse_set(["menu.fallback=best"])).menu.fallback == "best"
    with pytest.raises(BundleflowError, match="menu.fallback"):
        load_config(None, parse_set(["menu.fallback=grand"]))
    with pytest.raises(BundleflowError, match="posted_price_init"):
        load_config(None, parse_set(["menu.posted_price_init=true"]))


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    yield from isolated_bundleflow_home(tmp_path_factory, "bf-fallback")


def test_train_with_a_fallback_never_falls_below_it(env, capsys):
    """``menu.fallback=best`` + ``posted_price_init``: step 0 earns the fallback's validation
    revenue, selection keeps ≥ it, and the test revenue is ≥ the fitted baseline's."""
    runs = env / "runs"
    extra = ["menu.fallback=best", "menu.posted_price_init=true"]
    assert main(["train", *CPU_ARGS, "--runs-dir", str(runs), *_sets(extra)]) == 0
    run = _only_run(runs)
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r["val_revenue"] for r in records if "val_revenue" in r}
    assert sorted(val) == [0, 10, 20]
    info = json.loads((run / "run.json").read_text())
    dataset = load_dataset(info["data"]["path"], n_items=6)
    train, val_user, test = (dataset.part(p) for p in ("train", "val", "test"))
    posted, record = fit_posted_prices(train, "best")
    _, val_pay = posted.outcome(val_user)
    u_val, _ = posted.outcome(val_user)
    baseline_val = float(torch.where(u_val >= 0, val_pay, 0.0).mean())
    assert val[0] == pytest.approx(baseline_val, rel=1e-4)  # elements start weakly worse
    report = json.loads((run / "report.json").read_text())
    assert report["stage2"]["best_step"] in val
    assert max(val.values()) >= val[0]
    name = {"item": "item_pricing", "size": "bundle_size_pricing"}[record["kind"]]
    assert report["revenue"]["mean"] >= report["baselines"][name]["revenue"]["mean"] * (1 - 1e-5)
    assert report["ir_violations"] == 0
    assert report["fallback"]["kind"] == record["kind"]
    # menu query and show handle option J
    capsys.readouterr()
    assert main(["menu", "query", str(run), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "fallback_rate" in out and out["fallback"]["option"] == 32
    assert main(["menu", "query", str(run)]) == 0
    assert main(["menu", "show", str(run)]) == 0
    assert "fallback" in capsys.readouterr().out
    assert Path(run / "report.md").read_text().count("fallback") >= 1


def test_selection_keeps_the_untrained_menu_unless_the_gain_over_the_fallback_is_significant(
    env,
):
    """``stage2.select_min_z``: after step 0 a menu becomes the best only where its paired
    validation gain over the fallback alone has z ≥ the threshold. The metrics record z; the
    best validation revenue follows that rule; a threshold no gain can reach keeps step 0."""
    extra = ["menu.fallback=best", "menu.posted_price_init=true"]
    for z_min in (0.0, 1e9):
        runs = env / f"runs-z{z_min:g}"
        args = ["train", *CPU_ARGS, "--runs-dir", str(runs)]
        assert main([*args, *_sets([*extra, f"stage2.select_min_z={z_min}"])]) == 0
        run = _only_run(runs)
        records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        evals = [r for r in records if "val_revenue" in r]
        assert evals[0]["step"] == 0 and abs(evals[0]["val_gain_z"]) < 1e-6  # d ≡ 0 at step 0
        best = evals[0]["val_revenue"]
        for r in evals[1:]:
            if r["val_revenue"] > best and r["val_gain_z"] >= z_min:
                best = r["val_revenue"]
            assert r["best_val_revenue"] == pytest.approx(best)
        report = json.loads((run / "report.json").read_text())
        if z_min == 1e9:
            assert report["stage2"]["best_step"] == 0
