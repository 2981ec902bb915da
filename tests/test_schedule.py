"""λ schedule values at given steps, through a reset (hand-computed)."""

from __future__ import annotations

import math

import pytest

from bundleflow.maths.schedule import InvTempSchedule


def run(schedule: InvTempSchedule, locations: dict[int, float], last_step: int) -> dict[int, float]:
    """λ after each step; ``locations[i]`` is s at step i (only asked on multiples of 200)."""
    asked = []

    def loc_at(step):
        def f():
            asked.append(step)
            return locations[step]

        return f

    out = {step: schedule.update(step, loc_at(step)) for step in range(1, last_step + 1)}
    assert all(step % schedule.interval == 0 for step in asked)
    return out


def test_growth_then_reset_then_slow_growth():
    s = InvTempSchedule.reference()  # λ 1e-3, cap 0.2, reset 0.05
    locs = {200: 0.6, 400: 0.7, 600: 0.65, 800: 0.6, 1000: 0.9, 1200: 0.1, 1400: 0.2, 1600: 0.1}
    lam = run(s, locs, 1600)
    assert lam[199] == 1e-3
    assert math.isclose(lam[200], 1e-3 * 1.05)
    assert math.isclose(lam[400], 1e-3 * 1.05**2)  # s=0.7 > s_prev=0: no reset; s_prev=0.7
    assert math.isclose(lam[600], 1e-3 * 1.05**3)
    assert lam[800] == 0.05  # s=0.6 < 0.7 after growing: reset, f = 1.01
    assert s.factor == 1.01
    assert math.isclose(lam[1000], 0.05 * 1.01)
    assert math.isclose(lam[1200], 0.05 * 1.01**2)  # f = 1.01: checks are off
    assert math.isclose(lam[1600], 0.05 * 1.01**4)
    assert s.previous_location == 0.6


def test_low_location_never_resets():
    s = InvTempSchedule.reference()
    lam = run(s, {200: 0.45, 400: 0.4, 600: 0.3, 800: 0.2}, 800)
    assert math.isclose(lam[800], 1e-3 * 1.05**4)
    assert s.previous_location == 0.0  # the condition s > 0.5 never held


def test_cap_and_factor_restored_at_cap():
    s = InvTempSchedule(value=0.199, cap=0.2, reset_value=0.05, factor=1.01)
    lam = run(s, {200: 0.6, 400: 0.55}, 400)
    assert lam[200] == 0.2 and s.factor == 1.05  # capped: f back to 1.05
    assert lam[400] == 0.2  # min(cap, 0.2·1.05); s=0.55 > s_prev=0: no reset
    assert s.previous_location == 0.55


def test_scaled_schedule_is_a_unit_change():
    raw = InvTempSchedule.reference()
    norm = InvTempSchedule.reference().scaled(750.0)
    locs = {i: 0.6 + 0.1 * math.sin(i) for i in range(200, 4001, 200)}
    a, b = run(raw, locs, 4000), run(norm, locs, 4000)
    for step in (200, 800, 2400, 4000):
        assert math.isclose(b[step], 750.0 * a[step], rel_tol=1e-12)


def test_state_round_trip():
    s = InvTempSchedule.reference()
    run(s, {200: 0.6, 400: 0.7}, 400)
    t = InvTempSchedule()
    t.load_state_dict(s.state_dict())
    assert t == s
    with pytest.raises(KeyError):
        t.load_state_dict({"bogus": 1})


def test_default_is_the_reference_in_normalised_units():
    """Defaults: the reference's raw constants × 750, the CATS m=50 money scale."""
    assert InvTempSchedule() == InvTempSchedule.reference().scaled(750.0)
