"""Revenue of a menu given utilities: soft (training signal) and hard (what is reported).

Pure functions of ``utilities [B, J]`` (u_j(v) = E_{S~α_j} v(S) − p_j) and ``prices [J]``.
An optional ``extra`` option (``(utility [B], payment [B])``, e.g. posted prices from
:mod:`bundleflow.fallback`) is one more column after the J elements: index J, so the
elements win ties with it. Without it the numerics are exactly those of the reference.
"""

from __future__ import annotations

import torch
from torch import Tensor

WALK_AWAY = -1  # choice index of a bidder who buys nothing

Option = tuple[Tensor, Tensor]
"""One more option per valuation: utility ``[B]`` (−inf: not available) and payment ``[B]``."""


def soft_revenue(
    utilities: Tensor, prices: Tensor, inv_temp: float | Tensor, extra: Option | None = None
) -> Tensor:
    """Softmax relaxation with the walk-away option as a zero-utility, zero-price column.

    R̃ = mean_v Σ_j softmax(λ·[u_1(v) … u_J(v), 0])_j · p_j. With ``extra = (u_x, c_x)``:
    R̃ = mean_v (Σ_j π_j p_j + π_x c_x) over softmax(λ·[u_1 … u_J, u_x, 0]). Training
    signal only; never report it as a result.
    """
    walk_away = utilities.new_zeros(utilities.shape[0], 1)
    if extra is None:
        logits = torch.cat([utilities, walk_away], dim=1) * inv_temp  # (B, J+1)
        probs = torch.softmax(logits, dim=1)[:, :-1]  # (B, J): the walk-away column pays 0
        return (probs @ prices).mean()
    extra_u, extra_pay = (x.to(utilities.dtype) for x in extra)
    logits = torch.cat([utilities, extra_u[:, None], walk_away], dim=1) * inv_temp  # (B, J+2)
    probs = torch.softmax(logits, dim=1)
    return (probs[:, :-2] @ prices + probs[:, -2] * extra_pay).mean()


@torch.no_grad()
def hard_outcome(
    utilities: Tensor, prices: Tensor, extra: Option | None = None
) -> tuple[Tensor, Tensor]:
    """What each bidder does under the argmax mechanism.

    The bidder takes argmax_j u_j, ties going to the lowest index, if max_j u_j ≥ 0;
    otherwise walks away and pays 0. ``extra`` is option J (after every element).

    Returns:
        ``choice [B]`` (int64, :data:`WALK_AWAY` for no purchase; J for ``extra``) and
        ``payment [B]``.
    """
    if extra is not None:
        return _hard_outcome_with(utilities, prices, *extra)
    best, _ = utilities.max(dim=1)  # (B,)
    n_elements = utilities.shape[1]
    index = torch.arange(n_elements, device=utilities.device).expand_as(utilities)
    # Lowest index among the maxima, explicitly (not relying on argmax's tie order).
    first_best = torch.where(utilities == best[:, None], index, n_elements).amin(dim=1)
    buys = best >= 0
    choice = torch.where(buys, first_best, torch.full_like(first_best, WALK_AWAY))
    payment = torch.where(buys, prices[first_best.clamp(max=n_elements - 1)], 0.0)
    return choice, payment.to(prices.dtype)


def _hard_outcome_with(
    utilities: Tensor, prices: Tensor, extra_u: Tensor, extra_pay: Tensor
) -> tuple[Tensor, Tensor]:
    n_elements = utilities.shape[1]
    both = torch.cat([utilities, extra_u.to(utilities.dtype)[:, None]], dim=1)  # (B, J+1)
    best, _ = both.max(dim=1)
    index = torch.arange(n_elements + 1, device=both.device).expand_as(both)
    first_best = torch.where(both == best[:, None], index, n_elements + 1).amin(dim=1)
    buys = best >= 0
    choice = torch.where(buys, first_best, torch.full_like(first_best, WALK_AWAY))
    element_pay = prices[first_best.clamp(max=n_elements - 1)]
    paid = torch.where(first_best == n_elements, extra_pay.to(prices.dtype), element_pay)
    return choice, torch.where(buys, paid, 0.0).to(prices.dtype)


def hard_revenue(utilities: Tensor, prices: Tensor, extra: Option | None = None) -> Tensor:
    """Mean payment under the argmax mechanism with walk-away (see :func:`hard_outcome`)."""
    return hard_outcome(utilities, prices, extra)[1].mean()
