"""The fused per-point work (bundleflow.maths.fused) against the plain autograd path and the
recorded pass of the public code.

Independent answers: the recorded pass (its gradients, log-densities, bundles), the plain
path's autograd (bit for bit in float32 on the CPU: the same formulas in the same order),
and the brute-force value oracle.
"""

from __future__ import annotations

import copy
import shutil

import pytest
import torch

from bundleflow.evaluation.posted import PostedPrices
from bundleflow.maths.fused import (
    Kernels,
    fused_lotteries,
    fused_utilities,
    kernels_for,
    resolve_kernels,
)
from bundleflow.maths.menu import Menu, freeze_flow
from bundleflow.perf import bench
from bundleflow.train.stage2_step import (
    Stage2Step,
    StepOptions,
    as_bundles,
    make_optimizer,
    stage2_loss,
)
from bundleflow.valuations.xor import xor_value_bruteforce
from tests.conftest import single_torch_thread
from tests.test_reference_fixture import _flow, _menu, _rel

one_thread = pytest.fixture(scope="module", autouse=True)(single_torch_thread)

CFG = bench.BenchConfig(items=12, menu=40, support=4, batch=16, atoms=5, pool=64)


def _setup(items=CFG.items, seed=0):
    cfg = bench.BenchConfig(items=items, menu=CFG.menu, support=CFG.support, batch=CFG.batch,
                            atoms=CFG.atoms, pool=CFG.pool, seed=seed)  # fmt: skip
    flow, menu, pool, _ = bench.build(cfg, torch.device("cpu"))
    gen = torch.Generator().manual_seed(seed + 1)
    return flow, menu, pool[: cfg.batch], menu.draw_noise(gen)


def _loss_and_grads(menu, flow, batch, eps, **kw):
    menu = copy.deepcopy(menu)
    loss, second = stage2_loss(menu, flow, batch, 2e-3, 1e-3, eps, **kw)
    loss.backward()
    return loss.detach(), as_bundles(second, menu.means.shape), [p.grad for p in menu.parameters()]


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("additive", [False, True])
def test_fused_equals_plain_bit_for_bit_in_fp32(exact, additive):
    flow, menu, batch, eps = _setup()
    if additive:
        batch = batch[:, 0, :-1] * batch[:, 0, -1:]  # [B, m] item values
    plain = _loss_and_grads(menu, flow, batch, eps, exact_density_grad=exact)
    fused = _loss_and_grads(
        menu, flow, batch, eps, exact_density_grad=exact, kernels=kernels_for("fused")
    )
    assert torch.equal(plain[0], fused[0])
    assert torch.equal(plain[1], fused[1])
    for a, b in zip(plain[2], fused[2], strict=True):
        assert torch.equal(a, b)
    assert plain[2][0].abs().max() > 0  # M really gets a gradient


def test_fused_with_posted_price_option_equals_plain():
    flow, menu, batch, eps = _setup()
    prices = PostedPrices(item_prices=torch.full((CFG.items,), 40.0))
    plain = _loss_and_grads(menu, flow, batch, eps, posted=prices)
    fused = _loss_and_grads(menu, flow, batch, eps, posted=prices, kernels=kernels_for("fused"))
    assert torch.equal(plain[0], fused[0])
    for a, b in zip(plain[2], fused[2], strict=True):
        assert torch.equal(a, b)


def test_fused_utilities_are_brute_force_values():
    flow, menu, batch, eps = _setup()
    with torch.no_grad():
        lot = fused_lotteries(menu, flow, 1e-3, eps)
        u = fused_utilities(lot, menu.prices, batch)
    bundles = lot.bundles
    for b, j in [(0, 0), (3, 7), (15, 39), (9, 20)]:
        expected = sum(
            float(lot.alpha[j, d]) * xor_value_bruteforce(batch[b], bundles[j, d])
            for d in range(CFG.support)
        ) - float(menu.prices[j].detach())
        assert float(u[b, j]) == pytest.approx(expected, rel=1e-5, abs=1e-3)


def test_fused_matches_the_recorded_public_pass(reference_pass):
    ref = reference_pass
    flow, menu = _flow(ref), _menu(ref)
    lam = ref["inv_temp"]
    lot = fused_lotteries(menu, flow, lam, ref["eps"])
    assert _rel(lot.log_p0, ref["log_p0"]) < 1e-6
    assert _rel(lot.log_det, ref["trace_term"]) < 1e-6
    # one float32 ulp of the ≈ 900-nat ℓ under softmax: see test_reference_fixture
    assert _rel(lot.alpha, ref["alpha"]) < float(
        torch.finfo(torch.float32).eps * ref["ell"].abs().max()
    )
    assert torch.equal(lot.bundles, ref["bundles"])
    from bundleflow.maths.revenue import soft_revenue

    u = fused_utilities(lot, menu.prices, ref["valuations"])
    assert _rel(u, ref["utilities"]) < 1e-5
    (-soft_revenue(u, menu.prices, lam)).backward()
    assert _rel(menu.means.grad, ref["grad.initial_means"]) < 1e-4
    assert _rel(menu.logits.grad, ref["grad.initial_weights"]) < 1e-4
    assert _rel(menu.prices.grad, ref["grad.prices"]) < 1e-4


def test_low_precision_network_within_the_public_codes_fp16_tolerance():
    """bf16 network (the rank-one first backward layer): near the fp32 gradients, as far
    as the plain path's bf16 autocast is, and not silently fp32."""
    flow, menu, batch, eps = _setup(items=24)
    exact = _loss_and_grads(menu, flow, batch, eps)
    plain = _loss_and_grads(menu, flow, batch, eps, q_dtype=torch.bfloat16)
    fused = _loss_and_grads(
        menu, flow, batch, eps, q_dtype=torch.bfloat16, kernels=kernels_for("fused")
    )
    tol = bench.TOLERANCES["bf16"]
    for name, run in (("plain", plain), ("fused", fused)):
        assert abs(float(run[0] - exact[0])) <= tol["loss_rel"] * abs(float(exact[0])), name
        assert (run[1] != exact[1]).float().mean() <= tol["bundle_frac"], name
        for a, b in zip(run[2], exact[2], strict=True):
            assert _rel(a, b) <= tol["grad_rel"], name
    assert not torch.equal(fused[2][0], exact[2][0])


def test_fused_needs_a_frozen_flow():
    flow, menu, _, eps = _setup()
    flow.requires_grad_(True)
    with pytest.raises(ValueError, match="frozen flow"):
        fused_lotteries(menu, flow, 1e-3, eps)
    freeze_flow(flow)


def test_kernel_modes_resolve_by_device():
    assert resolve_kernels("auto", torch.device("cpu")) == "plain"
    assert resolve_kernels("auto", torch.device("cuda")) == "compiled"  # bf16: the CUDA default
    assert resolve_kernels("auto", torch.device("cuda"), low_precision=False) == "plain"
    assert resolve_kernels("fused", torch.device("cpu")) == "fused"
    assert kernels_for("plain") is None
    assert kernels_for("fused").compile is False
    with pytest.raises(ValueError, match="kernels"):
        resolve_kernels("fast", torch.device("cpu"))


def test_compile_failure_falls_back_to_eager_with_the_reason(monkeypatch):
    kernels = Kernels(compile=False)

    def broken(*_args):
        raise RuntimeError("no compiler here")

    kernels.compile = True  # pretend: compiled functions that fail when called
    names = (
        "prepare",
        "end_points",
        "density_grad",
        "means_grad",
        "rank_one_tanh_grad",
        "atom_max",
    )
    for name in names:
        getattr(kernels, name).compiled = broken
    flow, menu, batch, eps = _setup()
    plain = _loss_and_grads(menu, flow, batch, eps)
    fused = _loss_and_grads(menu, flow, batch, eps, kernels=kernels)
    assert "no compiler here" in kernels.eager_reason
    assert "compile failed" in kernels.description
    assert torch.equal(plain[0], fused[0])
    for a, b in zip(plain[2], fused[2], strict=True):
        assert torch.equal(a, b)


def _three_steps(kernels: str, broken: bool = False) -> tuple[Menu, Stage2Step]:
    """Three eager optimizer steps from the same seed; ``broken``: compiled kernels that
    fail when called."""
    flow, menu, _, _ = _setup()
    _, _, pool, _ = bench.build(CFG, torch.device("cpu"))
    gen = torch.Generator().manual_seed(5)
    opt = make_optimizer(menu, None, "eager")
    options = StepOptions(CFG.batch, mode="eager", kernels=kernels)
    step = Stage2Step(menu, flow, opt, pool, options, generator=gen)
    if broken:
        step.kernels = Kernels(compile=False)
        step.kernels.compile = True
        for name in ("prepare", "end_points", "density_grad", "means_grad"):
            getattr(step.kernels, name).compiled = _raise
    for _ in range(3):
        step(2e-3, 1e-3)
    return menu, step


def _raise(*_args):
    raise RuntimeError("no compiler here")


def test_stage2_step_falls_back_to_plain_kernels_when_compiling_fails():
    """A step whose compiled kernels fail: a warning with the reason, then the plain path
    (bit for bit the plain step's menu after three steps), and the precision says so."""
    plain, _ = _three_steps("plain")
    broken, step = _three_steps("fused", broken=True)
    assert "no compiler" in step.eager_reason
    assert step.precision.endswith(f"plain kernels ({step.eager_reason})")
    for a, b in zip(plain.parameters(), broken.parameters(), strict=True):
        assert torch.equal(a, b)


def test_stage2_step_with_fused_kernels_trains_like_plain():
    """Three eager optimizer steps from the same seed: identical menus (fp32, CPU)."""
    plain, _ = _three_steps("plain")
    fused, step = _three_steps("fused")
    assert step.last_bundles.shape == fused.means.shape
    for a, b in zip(plain.parameters(), fused.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.slow
@pytest.mark.skipif(
    not (shutil.which("g++") or shutil.which("c++")), reason="inductor's CPU backend needs g++"
)
def test_compiled_kernels_match_plain_on_cpu():
    """torch.compile'd pointwise functions (inductor's C++ backend here): the plain path's
    numbers within float rounding; the log N cancellation amplifies fused-multiply-add
    differences in ∂/∂M, so gradients are held to the fp32 parity tolerance of the bench."""
    flow, menu, batch, eps = _setup()
    kernels = Kernels(compile=True)
    plain = _loss_and_grads(menu, flow, batch, eps)
    fused = _loss_and_grads(menu, flow, batch, eps, kernels=kernels)
    assert kernels.eager_reason is None, kernels.eager_reason
    torch.testing.assert_close(fused[0], plain[0], rtol=1e-6, atol=0)
    assert torch.equal(plain[1], fused[1])
    for a, b in zip(plain[2], fused[2], strict=True):
        assert _rel(a, b) <= bench.TOLERANCES["fp32"]["grad_rel"]


def test_menu_roundtrip_of_fused_bundles():
    """1 − S in bf16 converts back to the same 0/1 bundles."""
    menu = Menu(6, 3, 2, generator=torch.Generator().manual_seed(0))
    lacks = torch.tensor([[1, 0, 1, 1, 0, 0]] * 6, dtype=torch.bfloat16)
    assert torch.equal(
        as_bundles(lacks, menu.means.shape)[0, 0], torch.tensor([0.0, 1, 0, 0, 1, 1])
    )
