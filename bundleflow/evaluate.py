"""Evaluating a frozen mechanism: hard revenue with its uncertainty and the sanity checks."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from bundleflow.baselines import fit_grand_bundle_price, grand_bundle_payments, grand_bundle_values
from bundleflow.mechanism import FrozenMechanism
from bundleflow.revenue import WALK_AWAY

Z95 = 1.959963984540054


def mean_ci(samples: Tensor) -> dict:
    """Mean and 95% normal-approximation confidence interval of per-valuation payments."""
    x = samples.double()
    n = x.numel()
    mean = float(x.mean())
    half = Z95 * float(x.std(unbiased=True)) / math.sqrt(n) if n > 1 else float("nan")
    return {"mean": mean, "ci95": [mean - half, mean + half], "n": n}


def json_safe(value: Any) -> Any:
    """``value`` with NaN/±inf replaced by None (JSON has no such numbers; ``json.dumps``
    would write ``NaN``/``Infinity``, which strict parsers such as jq reject)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


@torch.no_grad()
def evaluate_mechanism(
    mech: FrozenMechanism, test: Tensor, train: Tensor, *, batch_size: int = 1024
) -> dict:
    """Hard revenue of ``mech`` on ``test`` (user units) and the grand-bundle baseline.

    The grand-bundle price is fitted on ``train`` and scored on ``test``. IR is checked on
    the utilities actually realised: a buyer whose chosen element has negative utility is
    a violation (must be 0 by construction).
    """
    choice, payment, realised_u = (x.cpu() for x in mech.play(test, batch_size=batch_size))
    buys = choice != WALK_AWAY
    upper = float(grand_bundle_values(test).double().mean())
    revenue = mean_ci(payment)
    gb_price = fit_grand_bundle_price(train)
    gb = mean_ci(grand_bundle_payments(test, gb_price))
    prices = mech.prices.cpu()
    return {
        "n_test": int(test.shape[0]),
        "revenue": revenue,
        "fraction_of_max_value": revenue["mean"] / upper if upper > 0 else float("nan"),
        "expected_max_value": upper,
        "grand_bundle": {
            "price": gb_price,
            "revenue": gb,
            "fraction_of_max_value": gb["mean"] / upper if upper > 0 else float("nan"),
        },
        "ratio_to_grand_bundle": revenue["mean"] / gb["mean"] if gb["mean"] > 0 else float("inf"),
        "ir_violations": int(((realised_u < 0) & buys).sum()),
        "buy_rate": float(buys.double().mean()),
        "elements_in_use": int(torch.unique(choice[buys]).numel()),
        "menu_size": mech.menu_size,
        "negative_price_purchases": int((buys & (prices[choice.clamp(min=0)] < 0)).sum()),
    }
