"""CUDA specifics of the core (run with `pytest -m gpu` on a GPU machine; skipped elsewhere)."""

from __future__ import annotations

import pytest
import torch

from bundleflow.evaluation.mechanism import FrozenMechanism
from bundleflow.maths.menu import Menu
from bundleflow.maths.revenue import hard_outcome
from bundleflow.valuations.xor import xor_bundle_values

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def random_xor(n, k, m, gen):
    vals = torch.zeros(n, k, m + 1)
    vals[..., :m] = (torch.rand(n, k, m, generator=gen) < 0.2).float()
    vals[..., m] = torch.rand(n, k, generator=gen) * 100
    vals[:, -1] = 0  # a padding row in every valuation
    return vals


def test_oracle_bf16_on_cuda_equals_cpu_float32():
    gen = torch.Generator().manual_seed(0)
    vals = random_xor(128, 6, 50, gen)
    bundles = (torch.rand(40000, 50, generator=gen) < 0.8).float()
    cpu = xor_bundle_values(vals, bundles)
    cuda_default = xor_bundle_values(vals.cuda(), bundles.cuda())  # bf16 inclusion product
    cuda_chunked = xor_bundle_values(vals.cuda(), bundles.cuda(), chunk_elements=768 * 999)
    assert torch.equal(cuda_default.cpu(), cpu)
    assert torch.equal(cuda_chunked.cpu(), cpu)
    assert (cpu > 0).float().mean() > 0.05


def test_ties_lowest_index_on_cuda():
    u = torch.tensor([[0.5, 2.0, 2.0, 2.0], [2.0, 1.0, 2.0, -1.0], [-1.0, -2.0, -1.0, -3.0]])
    choice, payment = hard_outcome(u.cuda(), torch.tensor([1.0, 2.0, 3.0, 4.0]).cuda())
    assert choice.tolist() == [1, 0, -1]
    assert payment.tolist() == [2.0, 1.0, 0.0]


@pytest.mark.parametrize("path", ["fast", "reference"])
def test_reference_pass_on_cuda(reference_pass, path):
    from tests.test_reference_fixture import _flow, _menu

    ref = {k: v.cuda() for k, v in reference_pass.items()}
    flow = _flow(reference_pass).cuda()
    menu = _menu(reference_pass).cuda()
    lam = ref["inv_temp"]
    lot = menu.lotteries(flow, lam, eps=ref["eps"], path=path)
    u = menu.utilities(lot, ref["valuations"])
    assert torch.equal(lot.bundles, ref["bundles"])
    # ℓ ≈ 900 in float32: GPU summation order moves it by ulps, α by ≈ 1e-4.
    assert float((lot.ell.detach() - ref["ell"]).abs().max() / ref["ell"].abs().max()) < 1e-6
    scale = ref["utilities"].abs().max()
    assert float((u - ref["utilities"]).abs().max() / scale) < 1e-4
    mech = FrozenMechanism.freeze(menu, flow, float(lam), eps=ref["eps"], path=path)
    assert mech.revenue(ref["valuations"]) == pytest.approx(float(ref["hard_revenue"]), rel=1e-5)


def _random_mechanism(seed: int, items: int, elements: int, price_scale: float):
    """A frozen mechanism of random lotteries (a small untrained flow) and the generator
    that drew it, for CPU-against-CUDA comparisons."""
    from bundleflow.maths.flow import VelocityField

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    flow = VelocityField(items, hidden=32).requires_grad_(False)
    menu = Menu(items, elements, 4, generator=gen)
    with torch.no_grad():
        menu.prices.mul_(price_scale)
    return FrozenMechanism.freeze(menu, flow, 1.0, generator=gen), gen


def test_frozen_mechanism_same_outcome_cuda_and_cpu():
    mech, gen = _random_mechanism(1, items=20, elements=300, price_scale=50)
    vals = random_xor(500, 6, 20, gen)
    c_cpu, p_cpu = mech.outcome(vals)
    c_gpu, p_gpu = mech.to("cuda").outcome(vals.cuda())
    assert torch.equal(c_cpu, c_gpu.cpu())
    assert torch.equal(p_cpu, p_gpu.cpu())


def test_a_runs_report_plays_the_test_split_on_its_gpu_with_the_cpu_answer():
    """evaluate_mechanism(device="cuda") (what a GPU run's report does) gives the same
    revenue, payments and menu statistics as the CPU play."""
    from bundleflow.evaluation.evaluate import evaluate_mechanism

    mech, gen = _random_mechanism(2, items=10, elements=50, price_scale=20)
    train, test = random_xor(300, 4, 10, gen), random_xor(400, 4, 10, gen)
    cpu = evaluate_mechanism(mech, test, train, batch_size=64)
    gpu = evaluate_mechanism(mech, test, train, batch_size=64, device="cuda")
    assert gpu["revenue"] == cpu["revenue"]
    assert gpu["elements_in_use"] == cpu["elements_in_use"] and gpu["menu"] == cpu["menu"]
    assert gpu["ratio_to_best_baseline"] == cpu["ratio_to_best_baseline"]
