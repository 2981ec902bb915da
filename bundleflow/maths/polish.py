"""Price polish: coordinate ascent on the hard revenue of a frozen menu's prices.

Stage 2 optimises a soft (softmax) revenue; what is reported is the hard one (argmax, IR).
Given the frozen lotteries, each element's expected value w_ij = Σ_d α_jd v_i(S_jd) is
fixed, so the hard training revenue as a function of one price p_j, the others held, is
piecewise linear with its maxima just below the thresholds t_i = w_ij − u_i^{−j}, where
u_i^{−j} is bidder i's best utility without element j (the other elements, the posted-price
fallback, walking away at 0). With the thresholds sorted, R(p) over every candidate is one
cumulative sum: the exact best price for element j in O(N log N). Elements are visited in a
seeded random order; a round visits each once; every accepted change raises the training
revenue, so the polish never lowers it.

A menu with other prices is still a menu: DSIC and IR hold as before. Validation picks the
round to keep (round 0, the unpolished menu, included), so the validation revenue never
drops either. Tensors only; the Python loops are over the coordinate-ascent visits and the
soft phase's Adam steps (each depends on the previous one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from bundleflow.maths.revenue import hard_outcome, hard_revenue, soft_revenue


@dataclass
class PolishResult:
    prices: Tensor
    round_kept: int
    train_revenue: list[float] = field(default_factory=list)
    val_revenue: list[float] = field(default_factory=list)
    changed: list[int] = field(default_factory=list)


def _options(values: Tensor, prices: Tensor, fb_u: Tensor) -> Tensor:
    """Utilities ``[N, J+2]``: the J elements, the fallback, walking away (0)."""
    n, J = values.shape
    u = values.new_empty(n, J + 2)  # written in place: no [N, J] temporary beside it
    torch.sub(values, prices, out=u[:, :J])
    u[:, J] = fb_u
    u[:, J + 1] = 0
    return u


def _payments(idx: Tensor, prices: Tensor, fb_pay: Tensor) -> Tensor:
    """Payment of option ``idx [N]`` (J = fallback, J+1 = walk away) for each row."""
    J = prices.shape[0]
    el = prices[idx.clamp(max=J - 1)]
    return torch.where(idx < J, el, torch.where(idx == J, fb_pay, torch.zeros_like(fb_pay)))


def _top2(u: Tensor) -> tuple[Tensor, Tensor]:
    """The two best options per row, ties in the hard rule's order (lowest index first:
    ``topk`` does not promise that, and a bidder indifferent between the fallback and
    walking away buys). Sorted :data:`ROWS` rows at a time."""
    if u.shape[0] > ROWS:
        parts = [_top2(u[rows]) for rows in _row_blocks(u.shape[0])]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    vals, idx = torch.sort(u, dim=1, descending=True, stable=True)
    # copies: a view would keep the whole sorted block (values and int64 indices) alive
    return vals[:, :2].contiguous(), idx[:, :2].contiguous()


def _plateau_step(
    t: Tensor, cand: Tensor, alt_pay: Tensor, price: Tensor, current: float, margin: float, ok
) -> int | None:
    """``t`` sorted falling, ``alt_pay`` in its order, ``cand = t − margin``: the index of
    the candidate with the most buyers among those losing at most ``margin`` per buyer
    against ``current``, if it has more buyers than the price now; None otherwise."""
    buyers_now = int((t > price).sum())
    # the exact gain at each candidate, ties counted: the buyers are all thresholds > cand
    n_buy = torch.searchsorted(-t, -cand)  # (N,) t falls, so -t rises
    csum = torch.cat([alt_pay.new_zeros(1), torch.cumsum(alt_pay, 0)])
    exact = n_buy * cand - csum[n_buy]
    fine = ok & (exact >= current - margin * n_buy - 1e-9) & (n_buy > buyers_now)
    if not bool(fine.any()):
        return None
    return int(torch.where(fine, n_buy, -1).argmax())


ROWS = 1 << 16
"""Rows at a time for the row-wise passes over the ``[N, J]`` tables (the hard revenue, the
first two options, the unsold elements): their temporaries are ``[ROWS, J]``, not ``[N, J]``.
At 10⁶ training valuations × 1,000 elements whole-table passes held several 8 GB float64
copies (a 71.7 GB peak on an H100); at 10⁶ × 100 on a CPU the polish's peak went from 6.54 to
2.12 GiB with these blocks, the same prices. The results are the same row by row."""


def _row_blocks(n: int):
    return (slice(a, a + ROWS) for a in range(0, n, ROWS))


def hard_revenue_of(values: Tensor, prices: Tensor, fb_u: Tensor, fb_pay: Tensor) -> float:
    """Mean payment under the hard rule (:func:`bundleflow.maths.revenue.hard_revenue`: ties to
    the lowest index, the fallback after the elements, buy iff the best utility ≥ 0)."""
    n = values.shape[0]
    if n <= ROWS:
        return float(hard_revenue(values - prices, prices, (fb_u, fb_pay)))
    total = 0.0
    for rows in _row_blocks(n):
        extra = (fb_u[rows], fb_pay[rows])
        total += float(hard_outcome(values[rows] - prices, prices, extra)[1].sum())
    return total / n


@dataclass(frozen=True)
class _Ascent:
    """The knobs of one coordinate step (see :func:`polish_prices`)."""

    margin: float
    min_buyers: int
    plateau: bool


def _best_price(
    j: int,
    values: Tensor,
    prices: Tensor,
    top: tuple[Tensor, Tensor],
    fb_pay: Tensor,
    ranks: Tensor,
    knobs: _Ascent,
) -> Tensor | None:
    """Element ``j``'s best price with the others held, from every bidder's threshold
    t_i = w_ij − u_i^{−j} (``top``: each row's two best options, utilities and indices); None
    when no candidate beats the revenue at the price now (or, with ``plateau``, no
    near-neutral cut wins more buyers)."""
    top_u, top_i = top
    first = top_i[:, 0] == j
    alt_u = torch.where(first, top_u[:, 1], top_u[:, 0])
    alt_i = torch.where(first, top_i[:, 1], top_i[:, 0])
    alt_pay = _payments(alt_i, prices, fb_pay)
    t = values[:, j] - alt_u  # buys j iff p_j < t
    ts, order = torch.sort(t, descending=True)
    cum = torch.cumsum(alt_pay[order], dim=0)
    cand = ts - knobs.margin
    gain = ranks * cand - cum
    ok = (cand >= 0) & (ranks >= knobs.min_buyers) & torch.isfinite(cand)
    gain = torch.where(ok, gain, torch.full_like(gain, -torch.inf))
    k = int(gain.argmax())
    buyers = t > prices[j]
    current = float(((prices[j] - alt_pay) * buyers).sum())
    if not bool(ok[k]):
        return None
    if float(gain[k]) <= current + 1e-9 * values.shape[0]:
        if not knobs.plateau:
            return None
        k = _plateau_step(ts, cand, alt_pay[order], prices[j], current, knobs.margin, ok)
        if k is None:
            return None
    return cand[k]


def _set_price(
    j: int, price: Tensor, values: Tensor, prices: Tensor, u: Tensor, top: tuple[Tensor, Tensor]
) -> None:
    """Set p_j = ``price`` in place and refresh the utilities ``u`` and the two best options
    ``top`` of every row the change can affect (j among them, or j now beating the second)."""
    top_u, top_i = top
    prices[j] = price
    col = values[:, j] - prices[j]
    u[:, j] = col
    rows = ((top_i[:, 0] == j) | (top_i[:, 1] == j) | (col > top_u[:, 1])).nonzero().squeeze(1)
    for block in rows.split(ROWS):  # a [rows, J] copy at a time
        top_u[block], top_i[block] = _top2(u[block])


@dataclass(frozen=True)
class SoftPhase:
    """The price-only soft ascent between coordinate passes (see :func:`polish_prices`).

    ``temp``: softmax temperature in money units (sharp: a small fraction of the prices);
    ``lr``: Adam's step in money units; ``steps`` of ``batch`` training valuations each, the
    hard training revenue read every ``check_every`` steps and the best prices kept."""

    steps: int
    temp: float
    lr: float
    batch: int = 8192
    check_every: int = 25


def park_unsold(values: Tensor, prices: Tensor, fb_u: Tensor) -> Tensor:
    """Prices with every element no training bidder buys moved to twice the largest element
    value (above every training bidder's value for it: still unsold, the training revenue
    unchanged). An unsold copy of a sold lottery a hair dearer caps that lottery's price in
    coordinate ascent, and an unsold element priced between two sold ones blocks moving them
    (additive U[4,16]×U[4,7]: the bundle stuck at 10.98 against the optimum's 12 behind one
    such copy); parked, they no longer bind."""
    idx = torch.cat(  # ties: the lowest index, as played
        [_options(values[r], prices, fb_u[r]).argmax(dim=1) for r in _row_blocks(len(values))]
    )
    sold = torch.zeros(prices.shape[0] + 2, dtype=torch.bool, device=prices.device)
    sold[idx] = True
    park = 2 * values.max().clamp(min=0) + 1e-6
    return torch.where(sold[: prices.shape[0]], prices, park)


def soft_price_ascent(
    values: Tensor,
    prices: Tensor,
    fb_u: Tensor,
    fb_pay: Tensor,
    phase: SoftPhase,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Adam on the prices alone of the softmax revenue at temperature ``phase.temp``,
    lotteries frozen; returns the prices with the best hard training revenue seen (the input
    included, so it never lowers it). A joint move of several prices along a ridge of the
    piecewise-linear hard revenue (on U[4,16]×U[4,7]: the lottery 7.77 → 8 and the bundle
    11.54 → 12 together) that no single coordinate step takes."""
    best_p, best = prices.clone(), hard_revenue_of(values, prices, fb_u, fb_pay)
    p = prices.clone().requires_grad_(True)
    opt = torch.optim.Adam([p], lr=phase.lr)
    n = values.shape[0]
    for step in range(1, phase.steps + 1):
        rows = torch.randint(n, (min(phase.batch, n),), generator=generator).to(values.device)
        with torch.enable_grad():
            loss = -soft_revenue(values[rows] - p, p, 1.0 / phase.temp, (fb_u[rows], fb_pay[rows]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()
        if step % phase.check_every == 0 or step == phase.steps:
            now = p.detach()
            rev = hard_revenue_of(values, now, fb_u, fb_pay)
            if rev > best:
                best, best_p = rev, now.clone()
    return best_p


def polish_prices(
    values: Tensor,
    prices: Tensor,
    fb_u: Tensor,
    fb_pay: Tensor,
    *,
    rounds: int = 3,
    margin: float = 1e-6,
    min_buyers: int = 1,
    val: tuple[Tensor, Tensor, Tensor] | None = None,
    generator: torch.Generator | None = None,
    plateau: bool = False,
    soft: SoftPhase | None = None,
    min_z: float = 0.0,
) -> PolishResult:
    """Coordinate ascent on the prices ``[J]`` for element values ``[N, J]``.

    ``fb_u``/``fb_pay`` ``[N]``: the fallback's utility (−inf: none) and payment.
    ``margin``: a new price sits this far below the marginal bidder's threshold (strict
    preference, so ties never decide). ``min_buyers``: a price must sell to at least this
    many training bidders (a floor against prices fitted to one valuation). ``val``:
    (values, fb_u, fb_pay) of the validation split; the round with the best validation
    revenue is returned (round 0 = the input prices).

    ``plateau``: also accept a price cut that wins element j more buyers while losing at
    most ``margin`` per buyer (bidders who were paying the same elsewhere, now paying a hair
    less here). Such near-neutral moves let the ascent leave a trap no single strict gain
    leaves: on specialists + flexible, a lottery priced at its expected posted price must
    first match the loss-leader item's price (no gain) before raising that item pays.

    ``soft``: after the coordinate rounds, one more phase counted as one round: unsold
    elements parked (:func:`park_unsold`), a price-only soft ascent
    (:func:`soft_price_ascent`), then up to ``rounds`` coordinate rounds again.

    ``min_z``: a round of the soft phase (or after it) replaces the best validation round
    only where its paired validation gain is significant at this z (0: any higher validation
    revenue). The coordinate rounds before it are kept on any higher validation revenue, as
    before the soft phase existed: on additive U[0,1]² (where a posted price is optimal) the
    soft phase's insignificant validation gain lost 0.03% on test.
    """
    values = values.to(torch.float64)
    fb_u = fb_u.to(torch.float64)
    fb_pay = fb_pay.to(torch.float64)
    prices = prices.to(torch.float64).clone()
    knobs = _Ascent(margin=margin, min_buyers=min_buyers, plateau=plateau)
    val64 = None if val is None else tuple(x.to(torch.float64) for x in val)
    track = _Track(val64, prices, hard_revenue_of(values, prices, fb_u, fb_pay))
    prices = _coordinate_rounds(values, prices, fb_u, fb_pay, rounds, knobs, track, generator)
    if soft is not None and soft.steps > 0:
        track.min_z = min_z  # the soft phase's rounds must beat the best significantly
        start = park_unsold(values, prices, fb_u)
        prices = soft_price_ascent(values, start, fb_u, fb_pay, soft, generator)
        track.record(prices, hard_revenue_of(values, prices, fb_u, fb_pay), -1)
        prices = _coordinate_rounds(values, prices, fb_u, fb_pay, rounds, knobs, track, generator)
    return track.result(prices)


class _Track:
    """The rounds' training and validation revenues, and the prices of the best validation
    round (the last prices without a validation split). A round replaces the best where its
    validation revenue is higher and, with ``min_z`` > 0, its paired gain significant: z =
    mean(d)/SE(d) ≥ ``min_z`` over the per-valuation payment differences d."""

    def __init__(self, val: tuple[Tensor, ...] | None, prices: Tensor, train_rev: float):
        self.val, self.min_z = val, 0.0  # min_z is raised for the soft phase
        self.out = PolishResult(prices=prices.clone(), round_kept=0)
        self.best_pay: Tensor | None = None  # the best round's validation payments
        self.record(prices, train_rev, 0)

    def _better(self, pay: Tensor) -> bool:
        if self.best_pay is None:
            return True
        d = pay - self.best_pay
        if not float(d.mean()) > 0:
            return False
        se = float(d.std()) / math.sqrt(d.numel()) if d.numel() > 1 else 0.0
        return se == 0.0 or float(d.mean()) / se >= self.min_z

    def record(self, prices: Tensor, train_rev: float, changed: int) -> None:
        """One round: ``changed`` prices moved (−1: the soft phase)."""
        out = self.out
        pay = None
        if self.val is not None:
            values, fb_u, fb_pay = self.val
            pay = hard_outcome(values - prices, prices, (fb_u, fb_pay))[1]
        out.train_revenue.append(train_rev)
        out.val_revenue.append(float("nan") if pay is None else float(pay.mean()))
        out.changed.append(changed)
        if pay is not None and self._better(pay):
            self.best_pay, out.prices, out.round_kept = pay, prices.clone(), len(out.changed) - 1

    def result(self, prices: Tensor) -> PolishResult:
        if self.val is None:
            self.out.prices = prices
        return self.out


def _coordinate_rounds(
    values: Tensor,
    prices: Tensor,
    fb_u: Tensor,
    fb_pay: Tensor,
    rounds: int,
    knobs: _Ascent,
    track: _Track,
    generator: torch.Generator | None,
) -> Tensor:
    """Up to ``rounds`` coordinate-ascent rounds from ``prices``, each recorded in ``track``;
    stops early when a round moves no price."""
    prices = prices.clone()
    n, J = values.shape
    u = _options(values, prices, fb_u)
    top_u, top_i = _top2(u)
    ranks = torch.arange(1, n + 1, dtype=torch.float64, device=values.device)
    for _ in range(rounds):
        changed = 0
        for j in torch.randperm(J, generator=generator).tolist():
            price = _best_price(j, values, prices, (top_u, top_i), fb_pay, ranks, knobs)
            if price is None:
                continue
            _set_price(j, price, values, prices, u, (top_u, top_i))
            changed += 1
        track.record(prices, hard_revenue_of(values, prices, fb_u, fb_pay), changed)
        if changed == 0:
            break
    return prices
