"""Revenue of a menu given utilities: soft (training signal) and hard (what is reported).

Pure functions of ``utilities [B, J]`` (u_j(v) = E_{S~α_j} v(S) − p_j) and ``prices [J]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

WALK_AWAY = -1  # choice index of a bidder who buys nothing


def soft_revenue(utilities: Tensor, prices: Tensor, inv_temp: float | Tensor) -> Tensor:
    """Softmax relaxation with the walk-away option as a zero-utility, zero-price column.

    R̃ = mean_v Σ_j softmax(λ·[u_1(v) … u_J(v), 0])_j · p_j. Training signal only; never
    report it as a result.
    """
    walk_away = utilities.new_zeros(utilities.shape[0], 1)
    logits = torch.cat([utilities, walk_away], dim=1) * inv_temp  # (B, J+1)
    probs = torch.softmax(logits, dim=1)[:, :-1]  # (B, J): the walk-away column pays 0
    return (probs @ prices).mean()


@torch.no_grad()
def hard_outcome(utilities: Tensor, prices: Tensor) -> tuple[Tensor, Tensor]:
    """What each bidder does under the argmax mechanism.

    The bidder takes argmax_j u_j, ties going to the lowest index, if max_j u_j ≥ 0;
    otherwise walks away and pays 0.

    Returns:
        ``choice [B]`` (int64, :data:`WALK_AWAY` for no purchase) and ``payment [B]``.
    """
    best, _ = utilities.max(dim=1)  # (B,)
    n_elements = utilities.shape[1]
    index = torch.arange(n_elements, device=utilities.device).expand_as(utilities)
    # Lowest index among the maxima, explicitly (not relying on argmax's tie order).
    first_best = torch.where(utilities == best[:, None], index, n_elements).amin(dim=1)
    buys = best >= 0
    choice = torch.where(buys, first_best, torch.full_like(first_best, WALK_AWAY))
    payment = torch.where(buys, prices[first_best.clamp(max=n_elements - 1)], 0.0)
    return choice, payment.to(prices.dtype)


def hard_revenue(utilities: Tensor, prices: Tensor) -> Tensor:
    """Mean payment under the argmax mechanism with walk-away (see :func:`hard_outcome`)."""
    return hard_outcome(utilities, prices)[1].mean()
