"""The frozen mechanism: same revenue as the live menu, save/load on its own, clear errors."""

from __future__ import annotations

import pytest
import torch

from bundleflow.errors import BundleflowError
from bundleflow.evaluation.mechanism import FrozenMechanism
from bundleflow.maths.flow import VelocityField
from bundleflow.maths.menu import Menu, freeze_flow
from bundleflow.maths.revenue import WALK_AWAY, hard_outcome


def setup(seed=0, m=6, J=12, D=4, n_val=64):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    flow = freeze_flow(VelocityField(m, hidden=16))
    menu = Menu(m, J, D, generator=gen)
    with torch.no_grad():
        menu.prices.mul_(4.0)
    vals = torch.zeros(n_val, 3, m + 1)
    vals[..., :m] = (torch.rand(n_val, 3, m, generator=gen) < 0.3).float()
    vals[..., m] = torch.rand(n_val, 3, generator=gen) * 5
    eps = menu.draw_noise(gen)
    return flow, menu, vals, eps


def test_frozen_equals_live_menu_with_same_noise():
    flow, menu, vals, eps = setup()
    with torch.no_grad():
        lot = menu.lotteries(flow, 0.2, eps=eps)
        live_choice, live_pay = hard_outcome(menu.utilities(lot, vals), menu.prices)
    mech = FrozenMechanism.freeze(menu, flow, 0.2, eps=eps)
    choice, pay = mech.outcome(vals, batch_size=7)  # batching must not matter
    assert torch.equal(choice, live_choice)
    assert torch.equal(pay, live_pay)
    assert mech.revenue(vals) == pytest.approx(float(live_pay.mean()))
    assert (choice == WALK_AWAY).any() and (choice != WALK_AWAY).any()


def test_money_scale_reports_in_user_units():
    flow, menu, vals, eps = setup(seed=1)
    mech_norm = FrozenMechanism.freeze(menu, flow, 0.2, eps=eps)
    mech_user = FrozenMechanism.freeze(menu, flow, 0.2, eps=eps, money_scale=100.0)
    # The menu priced normalised money; valuations in user units are 100 × normalised ones.
    user_vals = vals.clone()
    user_vals[..., -1] *= 100.0
    assert mech_user.revenue(user_vals) == pytest.approx(100.0 * mech_norm.revenue(vals), rel=1e-5)


def test_save_load_round_trip(tmp_path):
    flow, menu, vals, eps = setup(seed=2)
    mech = FrozenMechanism.freeze(menu, flow, 0.2, inv_temp=3.5, eps=eps, meta={"run": "abc"})
    path = tmp_path / "sub" / "mechanism.safetensors"
    mech.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["mechanism.safetensors"]  # no temp left
    back = FrozenMechanism.load(path)
    for name in ("bundles", "alpha", "prices", "eps"):
        assert torch.equal(getattr(back, name), getattr(mech, name))
    assert back.meta == {"run": "abc"} and back.mix_temp == pytest.approx(0.2)
    assert back.inv_temp == 3.5 and back.n_steps == 5
    assert back.revenue(vals) == mech.revenue(vals)


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(BundleflowError, match="not found"):
        FrozenMechanism.load(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00\x01 definitely not safetensors")
    with pytest.raises(BundleflowError, match="bad.safetensors"):
        FrozenMechanism.load(bad)


def test_truncated_file_is_refused(tmp_path):
    flow, menu, _, eps = setup(seed=3)
    path = tmp_path / "mech.safetensors"
    FrozenMechanism.freeze(menu, flow, 0.2, eps=eps).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleflowError, match="mech.safetensors"):
        FrozenMechanism.load(path)
