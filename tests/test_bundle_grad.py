"""menu.bundle_grad=straight_through: hard values forward, a relaxed value's gradient back."""

from __future__ import annotations

import pytest
import torch

from bundleflow.errors import BundleflowError
from bundleflow.maths.flow import VelocityField, integrate
from bundleflow.maths.menu import Menu, freeze_flow, lottery_utilities, straight_through_delta
from bundleflow.maths.revenue import soft_revenue
from bundleflow.train.config import load_config
from bundleflow.train.plan import resolve_plan
from bundleflow.valuations.xor import xor_bundle_values, xor_relaxed_values


def one_bidder() -> torch.Tensor:
    """Atoms {0, 1} worth 3 and {2} worth 1 over m = 4 items: ``[1, 2, 5]``."""
    return torch.tensor([[[1.0, 1.0, 0.0, 0.0, 3.0], [0.0, 0.0, 1.0, 0.0, 1.0]]])


def test_relaxed_value_by_hand():
    vals = one_bidder()
    s = torch.tensor([[[1.0, 0.5, 0.0, 0.0], [0.0, 0.0, 0.8, 1.0]]], requires_grad=True)
    relaxed = xor_relaxed_values(vals, s)  # bundle 0: 3·1·0.5 = 1.5; bundle 1: 1·0.8 = 0.8
    assert torch.allclose(relaxed, torch.tensor([[1.5, 0.8]]))
    relaxed.sum().backward()
    # ∂(3·s0·s1)/∂s = (1.5, 3, 0, 0); ∂(1·s2)/∂s2 = 1 (atom {0,1} there: 0 < 0.8)
    assert torch.allclose(s.grad, torch.tensor([[[1.5, 3.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]]]))


def test_relaxed_value_is_the_xor_value_at_corners():
    gen = torch.Generator().manual_seed(0)
    vals = torch.zeros(5, 3, 7)
    vals[..., :6] = (torch.rand(5, 3, 6, generator=gen) < 0.4).float()
    vals[..., 6] = torch.rand(5, 3, generator=gen) * 10
    bundles = (torch.rand(9, 6, generator=gen) < 0.6).float()
    hard = xor_bundle_values(vals, bundles)  # (5, 9)
    relaxed = xor_relaxed_values(vals, bundles.expand(5, 9, 6))
    assert torch.allclose(relaxed, hard)


def test_straight_through_keeps_hard_utilities_and_moves_only_top_elements():
    gen = torch.Generator().manual_seed(1)
    J, D, m = 20, 2, 4
    bundles = (torch.rand(J, D, m, generator=gen) < 0.5).float()
    inclusion = (0.2 + 0.6 * torch.rand(J, D, m, generator=gen)).requires_grad_()
    alpha = torch.softmax(torch.randn(J, D, generator=gen), dim=1)
    prices = torch.rand(J, generator=gen)
    vals = one_bidder()
    plain = lottery_utilities(bundles, alpha, prices, vals)
    st = lottery_utilities(bundles, alpha, prices, vals, inclusion=inclusion)
    assert torch.equal(st.detach(), plain)  # the forward pass is the hard mechanism
    st[0, 3].backward()
    grad = inclusion.grad.abs().sum(dim=(1, 2))
    values = xor_bundle_values(vals, bundles.reshape(J * D, m)).view(1, J, D)
    top = ((values * alpha).sum(-1) - prices).topk(16, dim=1).indices[0]
    outside = torch.ones(J, dtype=torch.bool)
    outside[top] = False
    assert bool((grad[outside] == 0).all())
    assert bool(grad[3] > 0) == bool((top == 3).any())
    delta = straight_through_delta(values, alpha, prices, vals, inclusion)
    assert torch.equal(delta.detach(), torch.zeros_like(values))


def test_bundles_get_a_gradient_through_the_flow():
    torch.manual_seed(0)
    m = 4
    flow = freeze_flow(VelocityField(m, hidden=16))
    menu = Menu(m, 6, 2, generator=torch.Generator().manual_seed(0))
    vals = one_bidder().expand(3, 2, 5).clone()
    eps = menu.draw_noise(torch.Generator().manual_seed(1))
    grads = {}
    for temp in (None, 0.1):
        menu.zero_grad()
        lot = menu.lotteries(flow, 0.3, eps=eps, bundle_temp=temp)
        assert not lot.z_n.requires_grad and not lot.bundles.requires_grad
        loss = -soft_revenue(menu.utilities(lot, vals), menu.prices, 5.0)
        loss.backward()
        grads[temp] = (loss.detach(), menu.means.grad.clone())
    assert torch.equal(grads[None][0], grads[0.1][0])  # same forward value
    assert not torch.allclose(grads[None][1], grads[0.1][1])  # a second path to M


def test_end_grad_differentiates_the_euler_product():
    torch.manual_seed(0)
    flow = freeze_flow(VelocityField(3, hidden=8))
    z0 = torch.rand(5, 3, dtype=torch.float64, requires_grad=True)
    flow.double()

    def z_n(z):
        return integrate(flow, z, 5, end_grad=True).z_n

    assert torch.autograd.gradcheck(z_n, (z0,))
    with pytest.raises(ValueError, match="fast path"):
        integrate(flow, z0, 5, path="reference", end_grad=True)


def test_config_and_plan():
    cfg = load_config("tiny", {"menu": {"bundle_grad": "straight_through"}})
    plan = resolve_plan(cfg, torch.device("cpu"))
    assert plan.kernels.value == "plain" and "bundle_grad" in plan.kernels.reason
    with pytest.raises(BundleflowError, match="menu.bundle_grad"):
        load_config("tiny", {"menu": {"bundle_grad": "sometimes"}})
    with pytest.raises(BundleflowError, match="menu.bundle_temp"):
        load_config("tiny", {"menu": {"bundle_grad": "straight_through", "bundle_temp": 0.0}})


def test_step_refuses_fused_kernels_with_bundle_grad():
    """The fused backward carries only the trace term: asking for it with the bundle
    gradient is an error, not a silent switch (the plan chooses plain kernels)."""
    from bundleflow.train.stage2_step import Stage2Step, StepOptions, make_optimizer

    torch.manual_seed(0)
    flow = freeze_flow(VelocityField(4, hidden=8))
    menu = Menu(4, 6, 2, generator=torch.Generator().manual_seed(0))
    opt = make_optimizer(menu, None, "eager")
    pool = one_bidder().expand(3, 2, 5).clone()
    with pytest.raises(ValueError, match="plain"):
        Stage2Step(menu, flow, opt, pool, StepOptions(2, kernels="fused", bundle_temp=0.1))
    step = Stage2Step(menu, flow, opt, pool, StepOptions(2, kernels="plain", bundle_temp=0.1))
    assert torch.isfinite(step(5.0, 0.3))
