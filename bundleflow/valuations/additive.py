"""Additive valuations v(S) = v · S, the sanity setting with known optima.

For i.i.d. U[0,1] items the optimal revenue is 0.25 for m=1 (post price 0.5) and
≈ 0.549 for m=2 (Manelli–Vincent).
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def additive_bundle_values(values: Tensor, bundles: Tensor) -> Tensor:
    """``[B, m] @ [A, m]^T -> [B, A]``: the value of every bundle to every bidder."""
    if values.dim() != 2 or bundles.dim() != 2 or values.shape[1] != bundles.shape[1]:
        raise ValueError(
            f"additive values must be [B, m] and bundles [A, m]; got {tuple(values.shape)} "
            f"and {tuple(bundles.shape)}"
        )
    return values @ bundles.to(values.dtype).T
