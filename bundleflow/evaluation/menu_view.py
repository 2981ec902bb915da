"""A frozen menu as plain records, for `bundleflow menu show` and `bundleflow menu query`:
an element's lottery, the fallback's posted prices, and what each valuation of a batch buys
from the menu. Presentation only: every loop here runs over output rows, not a training path.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from bundleflow.evaluation.evaluate import json_safe
from bundleflow.evaluation.mechanism import FrozenMechanism
from bundleflow.maths.revenue import WALK_AWAY


def lottery(mech: FrozenMechanism, element: int, min_prob: float = 1e-3) -> list[dict]:
    """Element ``element``'s lottery: bundles (item lists) with probability ≥ ``min_prob``."""
    bundles, alpha = mech.bundles[element].cpu(), mech.alpha[element].cpu()
    return [
        {"bundle": bundles[d].nonzero().squeeze(1).tolist(), "prob": float(alpha[d])}
        for d in range(bundles.shape[0])  # D support points: presentation only
        if float(alpha[d]) >= min_prob
    ]


def fallback_record(mech: FrozenMechanism) -> dict | None:
    """The fallback's posted prices (user units; ``None`` for a size not for sale)."""
    fb = mech.fallback
    if fb is None:
        return None
    record: dict = {"option": mech.menu_size, "kind": fb.kind}
    if fb.item_prices is not None:
        record["item_prices"] = fb.item_prices.tolist()
    if fb.size_prices is not None:
        record["effective_size_prices"] = json_safe(fb.size_prices.tolist()[1:])
    return record


@dataclass
class Purchases:
    """What a batch of valuations buys from a frozen menu (:func:`purchases`)."""

    rows: list[dict]
    """One per valuation: ``index`` (its position in the file), ``element`` (J: the fallback;
    None: walks away), ``payment`` and ``utility``."""
    stats: dict
    """``n``, ``revenue`` (mean payment), ``buy_rate`` and, with a fallback, ``fallback_rate``
    (0 for no valuations)."""
    bought: list[int]
    """The menu elements some valuation buys, ascending (the fallback not among them)."""


def purchases(mech: FrozenMechanism, valuations: Tensor, offset: int = 0) -> Purchases:
    """Plays ``mech`` against ``valuations`` (user units; the first is number ``offset`` of its
    file) under the hard rule and lists what each one buys and pays."""
    choice, payment, utility = (x.cpu() for x in mech.play(valuations))
    J = mech.menu_size
    bought = sorted(set(choice[(choice != WALK_AWAY) & (choice < J)].tolist()))
    rows = [
        {
            "index": offset + n,
            "element": int(choice[n]) if int(choice[n]) != WALK_AWAY else None,
            "payment": float(payment[n]),
            "utility": float(utility[n]),
        }
        for n in range(valuations.shape[0])  # output rows: presentation only
    ]
    stats = {
        "n": len(rows),
        "revenue": float(payment.double().mean()) if rows else 0.0,
        "buy_rate": float((choice != WALK_AWAY).double().mean()) if rows else 0.0,
    }
    if mech.fallback is not None:  # option J: the posted prices
        stats["fallback_rate"] = float((choice == J).double().mean()) if rows else 0.0
    return Purchases(rows=rows, stats=stats, bought=bought)
