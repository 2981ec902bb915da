"""Menu parameterisation, gradients, integrator paths and persistence."""

from __future__ import annotations

import pytest
import torch

from bundleflow.maths.flow import VelocityField, default_hidden_sizes, integrate
from bundleflow.maths.menu import Menu, freeze_flow
from bundleflow.maths.revenue import soft_revenue


def tiny_setup(seed: int = 0, m: int = 5, J: int = 6, D: int = 3):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    flow = freeze_flow(VelocityField(m, hidden=16))
    menu = Menu(m, J, D, generator=gen)
    vals = torch.zeros(4, 2, m + 1)
    vals[:, 0, :m] = (torch.rand(4, m, generator=gen) < 0.4).float()
    vals[:, 0, m] = 2.0 + torch.rand(4, generator=gen)
    vals[:, 1, :m] = 1.0
    vals[:, 1, m] = 3.5
    return flow, menu, vals, gen


def test_widths_follow_the_reference():
    assert default_hidden_sizes(50) == (128, 128)
    assert default_hidden_sizes(100) == (128, 128)
    assert default_hidden_sizes(101) == (256, 512)
    wide = VelocityField(150)
    assert (wide.fc1.out_features, wide.fc2.out_features, wide.fct1.out_features) == (256, 512, 256)


def test_gradients_reach_means_logits_prices_not_the_flow():
    flow, menu, vals, gen = tiny_setup()
    lot = menu.lotteries(flow, 0.3, generator=gen)
    loss = -soft_revenue(menu.utilities(lot, vals), menu.prices, 0.5)
    loss.backward()
    for name in ("means", "logits", "prices"):
        grad = getattr(menu, name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    assert all(p.grad is None for p in flow.parameters())
    assert not lot.bundles.requires_grad and not lot.z_n.requires_grad


def test_enable_grad_switch():
    flow, menu, _, gen = tiny_setup()
    z0 = menu.support_locations().reshape(-1, 5)
    on = integrate(flow, z0, 5, enable_grad=True)
    off = integrate(flow, z0, 5, enable_grad=False)
    assert on.log_det.requires_grad
    assert not off.log_det.requires_grad and not off.q.requires_grad
    with pytest.raises(RuntimeError):
        off.log_det.sum().backward()
    assert torch.equal(on.z_n, off.z_n)


@pytest.mark.parametrize("n_steps", [1, 5, 20])
def test_fast_path_equals_reference_path(n_steps):
    torch.manual_seed(1)
    flow = VelocityField(7, hidden=32)
    z0 = 0.05 + 0.9 * torch.rand(200, 7)
    fast = integrate(flow, z0, n_steps, path="fast")
    ref = integrate(flow, z0, n_steps, path="reference")
    assert torch.allclose(fast.z_n, ref.z_n, rtol=1e-5, atol=1e-6)
    assert torch.allclose(fast.log_det, ref.log_det, rtol=1e-6, atol=1e-6)
    assert torch.allclose(fast.int_sigma.expand_as(ref.int_sigma), ref.int_sigma)


def test_fast_path_closed_form_in_float64():
    """z_N = z0 Π(1 + Qσ(i/N)/N) against a hand-rolled Euler loop in float64."""
    torch.manual_seed(2)
    flow = VelocityField(3, hidden=8).double()
    z0 = torch.rand(10, 3, dtype=torch.float64)
    out = integrate(flow, z0, 4, enable_grad=False)
    z = z0.clone()
    for i in range(4):
        t = torch.full((10, 1), i / 4, dtype=torch.float64)
        z = z + flow(z0, z, t) / 4
    assert torch.allclose(out.z_n, z, rtol=1e-12, atol=1e-14)


def test_sigma_is_persistent_state():
    _, menu, _, _ = tiny_setup()
    state = menu.state_dict()
    assert set(state) == {"means", "logits", "std", "prices"}
    other = Menu(5, 6, 3)
    assert not torch.equal(other.std, menu.std)
    other.load_state_dict(state)
    assert torch.equal(other.std, menu.std)
    assert not other.std.requires_grad
    assert float(menu.std.max()) <= torch.exp(torch.tensor(-4.0)) + 1e-9
    assert float(menu.std.min()) >= torch.exp(torch.tensor(-34.0)) * (1 - 1e-6)


def test_mean_support_location_statistic():
    _, menu, _, _ = tiny_setup()
    with torch.no_grad():
        menu.means.fill_(0.0)  # μ = 0.05 + 0.9 · 0.5 = 0.5 everywhere
    assert abs(menu.mean_support_location(1.0) - 0.5) < 1e-6
    with torch.no_grad():
        menu.means.fill_(10.0)  # μ → 0.95
    assert abs(menu.mean_support_location(1.0) - 0.95) < 1e-6


def test_top_atoms_ranks_distinct_bundles_by_total_value():
    """Hand-computed: atom {0,1} appears twice (values 3 and 4: total 7), {2} once (value 10),
    {1} once (value 2); padding rows (empty atoms) never count."""
    from bundleflow.train.menu_init import top_atoms

    v = torch.zeros(2, 3, 4)  # [N, K, m+1], m = 3
    v[0, 0] = torch.tensor([1.0, 1, 0, 3])
    v[0, 1] = torch.tensor([0.0, 0, 1, 10])
    v[1, 0] = torch.tensor([1.0, 1, 0, 4])
    v[1, 1] = torch.tensor([0.0, 1, 0, 2])
    got = top_atoms(v, 5)
    assert got.tolist() == [[0, 0, 1], [1, 1, 0], [0, 1, 0]]
    assert top_atoms(v, 1).tolist() == [[0, 0, 1]]


def test_atom_initialised_elements_sit_on_their_bundles_corner():
    """menu.init_bundles=atoms: every support point of element j starts on the corner of the
    j-th atom (μ = 0.05 + 0.9·sigmoid(±30) rounds to the atom), after the grand bundle."""
    from bundleflow.train.config import load_config
    from bundleflow.train.data import RunData
    from bundleflow.train.menu_init import build_menu, top_atoms

    gen = torch.Generator().manual_seed(0)
    v = torch.zeros(40, 3, 6)
    v[..., :5] = (torch.rand(40, 3, 5, generator=gen) < 0.4).float()
    v[..., -1] = torch.rand(40, 3, generator=gen) * 10
    data = RunData(kind="xor", n_items=5, scale=5.0, val=v[:4], test=v[:4], train_user=v)
    cfg = load_config("tiny", {"menu": {"size": 6, "init_bundles": "atoms"}})
    assert cfg.menu.grand_bundle_element is False
    menu = build_menu(cfg, data)
    expected = top_atoms(v, 6)
    corners = (menu.support_locations() >= 0.5).float()  # [J, D, m]
    assert torch.equal(corners, expected[:, None, :].expand_as(corners))


def test_init_inclusion_sets_the_share_of_items_in_the_initial_bundles():
    """menu.init_inclusion=ρ: M ~ N(Φ⁻¹(ρ), 1), so an item sits in a support point's initial
    bundle (μ ≥ 0.5 ⇔ M ≥ 0) with probability ρ; the reference's ρ = ½ leaves M ~ N(0, 1)
    (the same draw as without the key), and the grand-bundle element stays on its corner."""
    from bundleflow.errors import BundleflowError
    from bundleflow.train.config import load_config
    from bundleflow.train.data import RunData
    from bundleflow.train.menu_init import build_menu

    v = torch.zeros(8, 2, 31)
    v[..., 0], v[..., -1] = 1.0, 1.0
    data = RunData(kind="xor", n_items=30, scale=1.0, val=v, test=v, train_user=v)
    base = build_menu(load_config("tiny", {"menu": {"size": 400}}), data)
    half = build_menu(load_config("tiny", {"menu": {"size": 400, "init_inclusion": 0.5}}), data)
    assert torch.equal(base.means, half.means)
    for rho in (0.1, 0.9):
        cfg = load_config(
            "tiny", {"menu": {"size": 400, "init_inclusion": rho, "grand_bundle_element": True}}
        )
        menu = build_menu(cfg, data)
        inside = (menu.support_locations() >= 0.5).float()  # [J, D, m]
        assert inside[0].min() == 1  # the grand bundle
        share = inside[1:].mean().item()  # 399 · D · 30 Bernoulli(ρ) draws
        assert abs(share - rho) < 0.01, (rho, share)
        # the same draw as ρ = ½, shifted by Φ⁻¹(ρ) (1.2816 for 0.9)
        shift = (menu.means[1:] - base.means[1:]).unique()
        assert abs(abs(shift.mean().item()) - 1.2816) < 1e-3 and shift.std() < 1e-5
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(BundleflowError, match="menu.init_inclusion"):
            load_config("tiny", {"menu": {"init_inclusion": bad}})


def test_grand_bundle_prices_spread_the_elements_below_the_grand_bundles_price():
    """menu.grand_bundle_prices: element 0 at the grand bundle's fitted price p_G, the others
    U[0, p_G) (not U[0, price_init), nearly free); it needs menu.grand_bundle_element."""
    from bundleflow.errors import BundleflowError
    from bundleflow.train.config import load_config
    from bundleflow.train.data import RunData
    from bundleflow.train.menu_init import build_menu

    gen = torch.Generator().manual_seed(1)
    v = torch.zeros(50, 2, 7)
    v[..., :6] = (torch.rand(50, 2, 6, generator=gen) < 0.5).float()
    v[..., -1] = 1 + torch.rand(50, 2, generator=gen)
    data = RunData(kind="xor", n_items=6, scale=2.0, val=v, test=v, train_user=v)
    on = {"size": 400, "grand_bundle_element": True, "grand_bundle_prices": True}
    cfg = load_config("tiny", {"menu": on})
    menu = build_menu(cfg, data)
    grand = data.baselines().grand_bundle_price / data.scale
    assert grand > 10 * cfg.menu.price_init
    rest = menu.prices[1:].double() / grand
    assert abs(menu.prices[0].item() - grand) < 1e-6
    assert rest.min() >= 0 and rest.max() < 1
    assert abs(rest.mean().item() - 0.5) < 0.05 and rest.max() > 0.95  # U[0, 1) · p_G
    off = build_menu(load_config("tiny", {"menu": {**on, "grand_bundle_prices": False}}), data)
    assert off.prices[0] == menu.prices[0] and (off.prices[1:] < cfg.menu.price_init).all()
    with pytest.raises(BundleflowError, match="menu.grand_bundle_prices"):
        load_config("tiny", {"menu": {"grand_bundle_prices": True}})
