"""The inverse-temperature (λ, ``inv_temp``) schedule of Stage 2, with the reference's reset rule.

At every step i (counting from 1) that is a multiple of ``interval`` (200), in this order:

1. s = mean_j Σ_d softmax(τ·w_j)_d · mean_i μ_jd,i is computed with the current menu;
2. λ ← min(cap, λ·f); if λ reached the cap, f ← ``growth`` (1.05);
3. if i is a multiple of ``reset_interval`` (400) and s > ``location_threshold`` (0.5) and
   f > ``slow_growth`` (1.01): if s < s_prev, then λ ← ``reset_value`` and
   f ← ``slow_growth``; and (inside this same condition) s_prev ← s.

s_prev starts at 0, so the first check never resets. After a reset f stays at 1.01 (which
also disables further checks) until λ reaches the cap again.

Values are in normalised money units: the trainer divides money by a recorded scale s,
and λ_norm = λ_raw · s reproduces the reference's raw-unit dynamics. :meth:`reference`
gives the public code's raw constants (1e-3 → cap 0.2, reset 0.05).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

REFERENCE_MONEY_SCALE = 750.0
"""The money scale s the normalised defaults are set for (CATS arbitrary m=50: the mean max
atom value is about 750); every λ default is the reference's raw λ × s."""
REFERENCE_INITIAL = 1e-3
"""The public code's raw-unit starting λ (CATS XOR; additive: 0.1)."""
REFERENCE_CAP = 0.2
"""The public code's raw-unit largest λ."""
REFERENCE_RESET = 0.05
"""The public code's raw-unit λ after a reset."""


@dataclass
class InvTempSchedule:
    """λ schedule state; ``state_dict``/``load_state_dict`` make it resumable.

    The defaults (normalised money) are the one home of the λ defaults:
    :class:`bundleflow.train.config.InvTempConfig` takes its defaults from here.
    """

    value: float = REFERENCE_INITIAL * REFERENCE_MONEY_SCALE
    cap: float = REFERENCE_CAP * REFERENCE_MONEY_SCALE
    growth: float = 1.05
    reset_value: float = REFERENCE_RESET * REFERENCE_MONEY_SCALE
    slow_growth: float = 1.01
    interval: int = 200
    reset_interval: int = 400
    location_threshold: float = 0.5
    factor: float | None = None  # current f; starts at `growth`
    previous_location: float = 0.0  # s_prev
    last_location: float | None = None  # s from the last multiple of `interval`

    def __post_init__(self) -> None:
        if self.factor is None:
            self.factor = self.growth
        if self.interval <= 0 or self.reset_interval <= 0:
            raise ValueError("schedule intervals must be positive")

    @classmethod
    def reference(cls, initial: float = REFERENCE_INITIAL) -> InvTempSchedule:
        """The public code's raw-unit constants (CATS XOR: 1e-3; additive: 0.1)."""
        return cls(value=initial, cap=REFERENCE_CAP, reset_value=REFERENCE_RESET)

    def scaled(self, scale: float) -> InvTempSchedule:
        """The same schedule with every λ value multiplied by ``scale`` (unit change)."""
        return InvTempSchedule(
            **{
                **asdict(self),
                "value": self.value * scale,
                "cap": self.cap * scale,
                "reset_value": self.reset_value * scale,
            }
        )

    def update(self, step: int, mean_location: Callable[[], float]) -> float:
        """Apply the rule after optimiser step ``step`` (1-based); return the new λ.

        ``mean_location`` computes s from the current menu; it is only called on steps
        that are multiples of ``interval``.
        """
        if step % self.interval == 0:
            self.last_location = float(mean_location())
            self.value = min(self.cap, self.value * self.factor)
            if self.value >= self.cap:
                self.factor = self.growth
        s = self.last_location
        if (
            step % self.reset_interval == 0
            and s is not None
            and s > self.location_threshold
            and self.factor > self.slow_growth
        ):
            if s < self.previous_location:
                self.value = self.reset_value
                self.factor = self.slow_growth
            self.previous_location = s
        return self.value

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, val in state.items():
            if not hasattr(self, key):
                raise KeyError(f"unknown schedule state key {key!r}")
            setattr(self, key, val)
