"""Revenue of a menu given utilities: soft (training signal) and hard (what is reported).

Pure functions of ``utilities [B, J]`` (u_j(v) = E_{S~α_j} v(S) − p_j) and ``prices [J]``.
An optional ``extra`` option (``(utility [B], payment [B])``, e.g. posted prices from
:mod:`bundleflow.evaluation.posted`) is one more column after the J elements: index J, so the
elements win ties with it. Without it the numerics are exactly those of the reference.
"""

from __future__ import annotations

from collections.abc import Callable

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


def sharded_soft_revenue(
    utilities: Tensor,
    prices: Tensor,
    inv_temp: float,
    all_reduce: Callable[[Tensor, str], Tensor],
    extra: Option | None = None,
) -> tuple[Tensor, Tensor]:
    """Soft revenue when each rank holds the utilities ``[B, J_local]`` of its elements;
    ``all_reduce(tensor, op)`` (``sum`` / ``max``) reduces in place over the ranks.

    With a_bj = λ·u_bj, c_b = max(0, max_j a_bj) over all ranks, n_b = Σ_local e^{a−c}·p,
    d_b = Σ_local e^{a−c}: N = Σ_ranks n, D = Σ_ranks d + e^{−c} (the walk-away column) and
    R̃ = mean_b N_b / D_b. Only [B]-sized vectors cross ranks. Returns (surrogate, R̃): the
    surrogate mean_b (n_b/D_b − N_b·d_b/D_b²), with N and D constants, has exactly the
    gradient of R̃ with respect to this rank's parameters (the other ranks' terms do not
    depend on them), so no collective needs a backward pass.

    ``extra = (u_x, c_x)`` (e.g. the fallback), the same ``[B]`` on every rank (every rank
    holds the whole batch), is counted once like the walk-away column: c includes λ·u_x,
    and after the reduction N += e^{λu_x−c}·c_x, D += e^{λu_x−c}. It has no parameters.
    """
    logits = utilities * inv_temp  # (B, J_local)
    with torch.no_grad():
        top = logits.amax(dim=1).clamp(min=0)
        if extra is not None:
            extra_logit = extra[0].to(logits.dtype) * inv_temp  # (B,)
            top = torch.maximum(top, extra_logit)
        top = all_reduce(top, "max")
    weights = torch.exp(logits - top[:, None])
    num = weights @ prices  # (B,)
    den = weights.sum(dim=1)
    with torch.no_grad():
        totals = all_reduce(torch.stack([num, den]).detach(), "sum")
        big_n, big_d = totals[0], totals[1] + torch.exp(-top)
        if extra is not None:
            extra_weight = torch.exp(extra_logit - top)
            big_n = big_n + extra_weight * extra[1].to(big_n.dtype)
            big_d = big_d + extra_weight
    surrogate = (num / big_d - big_n / big_d**2 * den).mean()
    return surrogate, (big_n / big_d).mean()


def hard_choice(utilities: Tensor, payments: Tensor) -> tuple[Tensor, Tensor]:
    """The hard rule over the options on the last axis: the one implementation.

    The bidder takes the option of highest utility, ties going to the lowest index, iff that
    utility is ≥ 0; otherwise it walks away and pays 0. Menus, the fallback and every
    posted-price baseline are scored by this function.

    Args:
        utilities: ``[..., K]`` utility of each option.
        payments: what each option costs, broadcast to ``utilities`` (e.g. prices ``[K]``).

    Returns:
        ``choice [...]`` (int64, :data:`WALK_AWAY` for no purchase) and ``payment [...]``
        (in the dtype of ``payments``).
    """
    best = utilities.amax(dim=-1, keepdim=True)  # (..., 1)
    n_options = utilities.shape[-1]
    index = torch.arange(n_options, device=utilities.device)
    # Lowest index among the maxima, explicitly (not relying on argmax's tie order). A row
    # of NaN has no maximum (K): it walks away; the clamp only keeps the gather in range.
    first = torch.where(utilities == best, index, n_options).amin(dim=-1)  # (...,)
    first = first.clamp(max=n_options - 1)
    buys = best.squeeze(-1) >= 0
    paid = payments.expand_as(utilities).gather(-1, first.unsqueeze(-1)).squeeze(-1)
    choice = torch.where(buys, first, torch.full_like(first, WALK_AWAY))
    return choice, torch.where(buys, paid, torch.zeros_like(paid))


@torch.no_grad()
def hard_outcome(
    utilities: Tensor, prices: Tensor, extra: Option | None = None
) -> tuple[Tensor, Tensor]:
    """What each bidder does under the argmax mechanism (:func:`hard_choice` over the menu).

    ``utilities [B, J]``, ``prices [J]``; ``extra`` is option J (after every element, so
    the elements win ties with it).

    Returns:
        ``choice [B]`` (int64, :data:`WALK_AWAY` for no purchase; J for ``extra``) and
        ``payment [B]``.
    """
    if extra is None:
        return hard_choice(utilities, prices)
    extra_u, extra_pay = extra
    both_u = torch.cat([utilities, extra_u.to(utilities.dtype)[:, None]], dim=1)  # (B, J+1)
    element_pay = prices.expand(utilities.shape[0], -1)  # (J,) -> (B, J)
    both_pay = torch.cat([element_pay, extra_pay.to(prices.dtype)[:, None]], dim=1)  # (B, J+1)
    return hard_choice(both_u, both_pay)


def hard_revenue(utilities: Tensor, prices: Tensor, extra: Option | None = None) -> Tensor:
    """Mean payment under the argmax mechanism with walk-away (see :func:`hard_outcome`)."""
    return hard_outcome(utilities, prices, extra)[1].mean()
