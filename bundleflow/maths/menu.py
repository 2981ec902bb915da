"""Stage 2: the menu, a list of J lotteries over bundles with prices.

Element j has D support points. Per point d:

    μ_jd = a + b · sigmoid(10 · M_jd)            (a = 0.05, b = 0.9 for XOR valuations)
    z0_jd = μ_jd + σ_jd ⊙ ε                       (σ fixed and random: effectively Dirac)
    ℓ_jd = log N(z0_jd; μ_jd, σ_jd) + log(softmax_d(τ·w_j)_d + 1e-20) − ΣQ(z0_jd)·∫σ
    S_jd = 1[z_N(z0_jd) ≥ 0.5],  α_jd = softmax_d(ℓ_jd)
    u_j(v) = Σ_d α_jd · v(S_jd) − p_j

With ``lottery_weights = "mixture"`` (a bundleflow extension) α_jd = softmax_d(w_jd)
instead: the mass each Dirac source component carries through the flow.

τ is the mixture temperature (the reference uses its λ here too; with normalised money
the trainer passes λ / scale so that the mixture dynamics stay those of the reference).

σ spans e^−34 … e^−4, so Σ_i −log σ_jd,i differs by ≈ 55 nats between support points
while the trace term varies by ≈ 6: at initialisation most elements put almost all their
mass on one support point, as in the reference. This is kept on purpose (faithfulness).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bundleflow.maths.flow import IntegratorPath, VelocityField, integrate, round_bundles
from bundleflow.valuations.oracle import bundle_values
from bundleflow.valuations.xor import xor_relaxed_values

MIXTURE_EPS = 1e-20  # the reference's log(softmax + 1e-20)
_LOG_SQRT_2PI = math.log(math.sqrt(2 * math.pi))


@dataclass(frozen=True)
class Lotteries:
    """One forward pass of the menu through the flow (shapes for J elements, D points, m items).

    ``bundles`` and ``z_n`` carry no gradient; ``alpha`` does (to M through the trace
    term and to w through the mixture term).
    """

    mu: Tensor  # [J, D, m]
    z0: Tensor  # [J, D, m]
    log_p0: Tensor  # [J, D]
    log_mix: Tensor  # [J, D]
    q: Tensor  # [J, D, m]
    int_sigma: Tensor  # [] (fast) or [J, D] (reference)
    log_det: Tensor  # [J, D]  ΣQ · ∫σ
    ell: Tensor  # [J, D]
    alpha: Tensor  # [J, D]
    z_n: Tensor  # [J, D, m]
    bundles: Tensor  # [J, D, m] 0/1
    inclusion: Tensor | None = None  # [J, D, m] relaxed 1[i ∈ S] with a gradient, or None


def log_normal_of_offset(diff: Tensor, scale: Tensor) -> Tensor:
    """Elementwise log N(loc + diff; loc, scale²), term by term as torch.distributions.Normal."""
    return -(diff**2) / (2 * scale**2) - scale.log() - _LOG_SQRT_2PI


def support_locations(means: Tensor, loc_offset: float, loc_scale: float) -> Tensor:
    """μ = a + b·sigmoid(10·M), elementwise (:meth:`Menu.support_locations`)."""
    return loc_offset + loc_scale * torch.sigmoid(means * 10)


def support_weights(log_p0: Tensor, log_mix: Tensor, log_det: Tensor) -> tuple[Tensor, Tensor]:
    """ℓ = (log N + log mixture) − ΣQ·∫σ and α = softmax_d(ℓ), both ``[J, D]``."""
    ell = (log_p0 + log_mix) - log_det
    return ell, torch.exp(ell - torch.logsumexp(ell, dim=-1, keepdim=True))


def freeze_flow(flow: VelocityField) -> VelocityField:
    """Make the flow a constant of Stage 2: no parameter requires grad; eval mode."""
    flow.requires_grad_(False)
    return flow.eval()


class Menu(nn.Module):
    """J menu elements, each a D-point lottery over bundles of m items, and a price.

    Parameters: ``means`` M ``[J, D, m]`` (init randn), ``logits`` w ``[J, D]`` (init
    randn / D), ``prices`` p ``[J]`` (init U[0, price_scale)). Buffer ``std`` σ
    ``[J, D, m]`` = exp(−30·U[0,1) − 4) is fixed, random and persistent (saved with the
    state dict).
    """

    def __init__(
        self,
        n_items: int,
        menu_size: int,
        support_size: int,
        *,
        loc_offset: float = 0.05,
        loc_scale: float = 0.9,
        price_scale: float = 1.0,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        shape = (menu_size, support_size, n_items)
        kw = {"generator": generator, "device": device}
        self.n_items, self.menu_size, self.support_size = n_items, menu_size, support_size
        self.loc_offset, self.loc_scale = loc_offset, loc_scale
        self.lottery_weights = "density"  # or "mixture" (config menu.lottery_weights)
        self.means = nn.Parameter(torch.randn(shape, **kw))
        self.logits = nn.Parameter(torch.randn(shape[:2], **kw) / support_size)
        self.register_buffer("std", torch.exp(-torch.rand(shape, **kw) * 30 - 4))
        self.prices = nn.Parameter(torch.rand(menu_size, **kw) * price_scale)

    @classmethod
    def from_tensors(
        cls,
        means: Tensor,
        logits: Tensor,
        std: Tensor,
        prices: Tensor,
        *,
        loc_offset: float = 0.05,
        loc_scale: float = 0.9,
        lottery_weights: str = "density",
    ) -> Menu:
        """A menu holding copies of given tensors (e.g. the reference's menu parameters)."""
        menu_size, support_size, n_items = means.shape
        menu = cls(
            n_items,
            menu_size,
            support_size,
            loc_offset=loc_offset,
            loc_scale=loc_scale,
            device="meta",
        )
        menu.means = nn.Parameter(means.detach().clone())
        menu.logits = nn.Parameter(logits.detach().clone())
        menu.prices = nn.Parameter(prices.detach().clone())
        menu.std = std.detach().clone()
        menu.lottery_weights = lottery_weights
        return menu

    def support_locations(self) -> Tensor:
        """μ = a + b·sigmoid(10·M): ``[J, D, m]``."""
        return support_locations(self.means, self.loc_offset, self.loc_scale)

    def draw_noise(self, generator: torch.Generator | None = None) -> Tensor:
        """Fresh ε ``[J, D, m]`` ~ N(0, I)."""
        return torch.randn(
            self.means.shape, generator=generator, device=self.means.device, dtype=self.means.dtype
        )

    def mixture_weights(self, mix_temp: float | Tensor) -> Tensor:
        """softmax_d(τ·w_j): ``[J, D]``."""
        return torch.softmax(mix_temp * self.logits, dim=1)

    def log_mixture_weights(self, mix_temp: float | Tensor) -> Tensor:
        """log(softmax_d(τ·w_j) + 1e-20): ``[J, D]`` (the reference's guard)."""
        return torch.log(self.mixture_weights(mix_temp) + MIXTURE_EPS)

    @torch.no_grad()
    def mean_support_location(self, mix_temp: float | Tensor) -> float:
        """mean_j Σ_d softmax(τ·w_j)_d · mean_i μ_jd,i — the statistic of the λ reset rule."""
        per_point = self.support_locations().mean(dim=-1)  # (J, D)
        return float((self.mixture_weights(mix_temp) * per_point).sum(dim=-1).mean())

    def lotteries(
        self,
        flow: VelocityField,
        mix_temp: float | Tensor,
        *,
        eps: Tensor | None = None,
        n_steps: int = 5,
        path: IntegratorPath = "fast",
        generator: torch.Generator | None = None,
        exact_density_grad: bool = False,
        q_dtype: torch.dtype | None = None,
        bundle_temp: float | None = None,
    ) -> Lotteries:
        """Push every support point through the flow: bundles and their probabilities.

        Both paths give the same forward values. ``path`` picks the integrator (see
        :func:`bundleflow.maths.flow.integrate`).

        ``exact_density_grad``: by default log N(z0; μ, σ) is differentiated through both
        z0 and μ, as the public code does. Mathematically that gradient is zero, but with σ
        as small as e^−34 the two huge terms cancel only up to rounding and swamp part of
        the trace-term gradient (≈1.1% of the largest entry of ∂/∂M on the recorded
        fixture). ``True`` differentiates through a detached z0 − μ instead: the same
        forward values and the exact gradient (checked against float64 in the tests).

        ``q_dtype``: the flow network's precision (see :func:`bundleflow.maths.flow.integrate`).

        ``bundle_temp`` T (``menu.bundle_grad=straight_through``): also return the relaxed
        inclusion s = sigmoid((z_N − 0.5)/T) with a gradient through z_N and the flow to M;
        :meth:`utilities` then differentiates the relaxed value while keeping the hard one.
        """
        if eps is None:
            eps = self.draw_noise(generator)
        J, D, m = self.means.shape
        mu = self.support_locations()
        z0 = mu + eps * self.std  # reparameterised, as Normal.rsample
        diff = (z0 - mu).detach() if exact_density_grad else z0 - mu
        log_p0 = log_normal_of_offset(diff, self.std).sum(dim=-1)  # (J, D)
        log_mix = self.log_mixture_weights(mix_temp)  # (J, D)
        flowed = integrate(
            flow,
            z0.reshape(J * D, m),
            n_steps,
            path=path,
            q_dtype=q_dtype,
            end_grad=bundle_temp is not None,
        )
        log_det = flowed.log_det.reshape(J, D)
        int_sigma = flowed.int_sigma
        if int_sigma.dim() > 0:
            int_sigma = int_sigma.reshape(J, D)
        if self.lottery_weights == "mixture":  # α = the mass of each Dirac component
            ell = torch.log_softmax(self.logits, dim=1)
            alpha = torch.softmax(self.logits, dim=1)
        else:
            ell, alpha = support_weights(log_p0, log_mix, log_det)
        z_n = flowed.z_n.reshape(J, D, m)
        inclusion = None
        if bundle_temp is not None:
            inclusion = torch.sigmoid((z_n - 0.5) / bundle_temp)
            z_n = z_n.detach()
        return Lotteries(
            mu=mu,
            z0=z0,
            log_p0=log_p0,
            log_mix=log_mix,
            q=flowed.q.reshape(J, D, m),
            int_sigma=int_sigma,
            log_det=log_det,
            ell=ell,
            alpha=alpha,
            z_n=z_n,
            bundles=round_bundles(z_n),
            inclusion=inclusion,
        )

    def utilities(self, lotteries: Lotteries, valuations: Tensor, **oracle_kw) -> Tensor:
        """u ``[B, J]`` for XOR ``[B, K, m+1]`` or additive ``[B, m]`` valuations."""
        return lottery_utilities(
            lotteries.bundles,
            lotteries.alpha,
            self.prices,
            valuations,
            inclusion=lotteries.inclusion,
            **oracle_kw,
        )


RELAXED_TOP_K = 16
"""Elements per valuation whose bundles get the straight-through gradient: its best ones by
hard utility. The soft revenue's gradient to u_bj is weighted by the bidder's softmax
probability of choosing j, negligible outside its best few elements once λ has grown."""


def straight_through_delta(
    values: Tensor, alpha: Tensor, prices: Tensor, valuations: Tensor, inclusion: Tensor
) -> Tensor:
    """Zero ``[B, J, D]`` in value whose gradient is that of the relaxed XOR value
    (:func:`bundleflow.valuations.xor.xor_relaxed_values`) at each valuation's
    :data:`RELAXED_TOP_K` best elements (by hard utility)."""
    B, (J, D, m) = values.shape[0], inclusion.shape
    k = min(RELAXED_TOP_K, J)
    with torch.no_grad():
        top = ((values * alpha).sum(dim=-1) - prices).topk(k, dim=1).indices  # (B, k)
    chosen = inclusion[top]  # (B, k, D, m)
    relaxed = xor_relaxed_values(valuations, chosen.reshape(B, k * D, m)).view(B, k, D)
    delta = (relaxed - relaxed.detach()).to(values.dtype)
    return torch.zeros_like(values).scatter_add(1, top.unsqueeze(-1).expand(B, k, D), delta)


def lottery_utilities(
    bundles: Tensor,
    alpha: Tensor,
    prices: Tensor,
    valuations: Tensor,
    *,
    inclusion: Tensor | None = None,
    **oracle_kw,
) -> Tensor:
    """u_j(v) = Σ_d α_jd v(S_jd) − p_j for bundles ``[J, D, m]``, α ``[J, D]``, p ``[J]``.

    XOR valuations ``[B, K, m+1]`` go through the value oracle on all J·D bundles;
    additive ones ``[B, m]`` use v·(Σ_d α_jd S_jd), one ``[B, m] @ [m, J]`` product.
    ``inclusion`` (relaxed bundles ``[J, D, m]`` with a gradient): straight-through — the
    values are the hard ones, their gradient that of the relaxed value (XOR:
    :func:`bundleflow.valuations.xor.xor_relaxed_values`; additive: v·s).
    """
    J, D, m = bundles.shape
    if valuations.dim() == 2:
        if inclusion is not None:
            bundles = bundles + (inclusion - inclusion.detach())
        expected_bundle = (alpha.unsqueeze(-1) * bundles).sum(dim=1)  # (J, m)
        return valuations @ expected_bundle.T - prices  # (B, m) @ (m, J) -> (B, J)
    values = bundle_values(valuations, bundles.reshape(J * D, m), **oracle_kw)  # (B, J·D)
    values = values.view(-1, J, D).to(alpha.dtype)
    if inclusion is not None:
        values = values + straight_through_delta(values, alpha, prices, valuations, inclusion)
    return (values * alpha).sum(dim=-1) - prices  # (B, J)
