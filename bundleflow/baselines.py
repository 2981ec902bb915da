"""Mechanisms a learned menu is compared against (see the baselines spec).

Pure functions of valuation tensors in the user's units: XOR ``[N, K, m+1]`` or additive
``[N, m]``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def grand_bundle_values(valuations: Tensor) -> Tensor:
    """v(all items) per bidder: max_k b_k (XOR, free disposal) or Σ_i v_i (additive)."""
    if valuations.dim() == 3:
        return valuations[..., -1].amax(dim=1)
    return valuations.sum(dim=1)


def fit_grand_bundle_price(train: Tensor) -> float:
    """The revenue-maximising single price on ``train``, in closed form.

    Sort v_(1) ≥ … ≥ v_(N); posting P = v_(i) sells to at least i bidders, so
    P* = v_(i*) with i* = argmax_i i·v_(i)/N (ties: the larger count).
    """
    values = grand_bundle_values(train).double().sort(descending=True).values
    if values.numel() == 0:
        raise ValueError("cannot fit a price on no valuations")
    counts = torch.arange(1, values.numel() + 1, dtype=torch.float64)
    revenue = counts * values
    best = int(torch.argmax(revenue))  # first maximum: the highest price among ties
    return float(values[best])


def grand_bundle_payments(valuations: Tensor, price: float) -> Tensor:
    """Payments ``[N]``: the bidder buys the grand bundle iff its value ≥ price."""
    values = grand_bundle_values(valuations)
    return torch.where(values >= price, torch.full_like(values, price), torch.zeros_like(values))
