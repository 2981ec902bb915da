"""The fast path's per-point work in few kernels, with a hand-written backward.

:meth:`Menu.lotteries` is written as plain autograd operations: every elementwise step over
the ``[J, D, m]`` tensors (μ, z0, log N, the Euler product, the threshold, and each of
their backward steps) is one kernel and one pass over memory. At m=500 (2·10⁷ entries per
tensor) those passes took ≈ 2.4 of 3.8 ms of a bf16 step on an H200 (BENCHMARKS.md). This
module computes the same quantities as three pointwise functions and the flow network:

- ``prepare``: μ = a + b·sigmoid(10M), z0 = μ + σ⊙ε, Σ log N(z0; μ, σ) — one pass;
- the network Q(z0) with its two hidden activations kept for the backward;
- ``end_points``: the closed-form Euler product, the threshold (written directly as
  1 − S in the dtype of the value oracle's inclusion product) and ΣQ·∫σ — one pass;
- backward: ∂/∂Q is ∂ℓ/∂(log det)·∫σ on every item, so the first layer of the network's
  backward is a rank-one product in low precision (fp32 keeps the matrix product, so its
  rounding is that of the plain path); ``density_grad`` and ``means_grad`` then apply the
  log N and sigmoid chain — two passes (one with ``exact_density_grad``).

The pointwise functions are plain PyTorch (their eager form runs anywhere and is what the
CPU tests check against :meth:`Menu.lotteries`); :class:`Kernels` can hand them to
``torch.compile`` so that each becomes one generated kernel (Triton on CUDA). A compiler
failure falls back to the eager functions with the reason recorded.

The numerics are those of the plain path: the same formulas in the same order, including
the reference's differentiation of log N through both z0 and μ (``exact_density_grad``
off) with its cancellation; the flow must be frozen (no parameter requires grad).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from loguru import logger
from torch import Tensor

from bundleflow.maths.flow import VelocityField, sigma_grid_integral
from bundleflow.maths.menu import (
    log_normal_of_offset,
    lottery_utilities,
    support_locations,
    support_weights,
)
from bundleflow.valuations.xor import default_inclusion_dtype, xor_values_from_lacks

KERNEL_MODES = ("plain", "fused", "compiled")


def resolve_kernels(mode: str, device: torch.device, low_precision: bool = True) -> str:
    """``auto``: ``compiled`` on CUDA when the flow network runs in bf16/fp16
    (``low_precision``), else ``plain`` (measured: BENCHMARKS.md).

    In fp32 the generated kernels' sigmoid and fused multiply-adds move μ by an ulp here
    and there, and the reference's differentiation of log N through z0 and μ turns that
    into gradient differences of ≈ 2% of the largest entry at m=500 — inside the
    bf16/fp16 band the reduced precisions are held to, outside the fp32 one (1e-3). So
    fp32 keeps the plain kernels unless ``compiled`` is asked for."""
    if mode == "auto":
        return "compiled" if device.type == "cuda" and low_precision else "plain"
    if mode not in KERNEL_MODES:
        raise ValueError(f"kernels must be auto or one of {KERNEL_MODES}, got {mode!r}")
    return mode


# ----------------------------------------------------------------------------- pointwise


def prepare(
    means: Tensor,
    eps: Tensor,
    std: Tensor,
    loc_offset: float,
    loc_scale: float,
    net_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    """z0 ``[J, D, m]``, z0 in the network's dtype, and Σ_i log N(z0; μ, σ) ``[J, D]``
    (the formulas of Menu.lotteries)."""
    mu = support_locations(means, loc_offset, loc_scale)
    z0 = mu + eps * std
    log_p0 = log_normal_of_offset(z0 - mu, std).sum(dim=-1)
    return z0, z0.to(net_dtype), log_p0


def end_points(
    z0: Tensor, q: Tensor, step_sigmas: Tensor, int_sigma: Tensor, lacks_dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """1 − S ``[P, m]`` (S = 1[z_N ≥ 0.5]) in ``lacks_dtype`` and ΣQ·∫σ ``[P]``.

    ``step_sigmas[i]`` = σ(i/N)/N; the product runs in the order of :func:`integrate`.
    """
    q = q.float()
    growth = 1 + q * step_sigmas[0]
    for i in range(1, step_sigmas.shape[0]):
        growth = growth * (1 + q * step_sigmas[i])
    z_n = z0 * growth
    lacks = (~(z_n >= 0.5)).to(lacks_dtype)
    return lacks, q.sum(dim=-1) * int_sigma


def density_grad(
    means: Tensor,
    eps: Tensor,
    std: Tensor,
    grad_log_p0: Tensor,
    loc_offset: float,
    loc_scale: float,
) -> Tensor:
    """∂L/∂diff of Σ log N for diff = z0 − μ ``[J, D, m]``, in autograd's order:
    (−g / (2σ²)) · 2 · diff. Returned as a tensor of its own (see :func:`means_grad`)."""
    mu = support_locations(means, loc_offset, loc_scale)
    diff = (mu + eps * std) - mu
    return (-grad_log_p0.unsqueeze(-1) / (2 * std**2)) * (2 * diff)


def means_grad(
    means: Tensor, grad_z0: Tensor, grad_diff: Tensor | None, loc_scale: float
) -> Tensor:
    """∂L/∂M from ∂L/∂z0 through the network (``grad_z0``) and ∂L/∂diff (``grad_diff``).

    With ``grad_diff`` (the reference's differentiation of log N through z0 and through μ),
    ∂L/∂μ is (g + g_diff) − g_diff as autograd accumulates it: rounding included, which
    for σ down to e^−34 decides the result. ``grad_diff`` must come from memory, not from
    a product in the same kernel: a compiler that fuses that product into the addition (an
    FMA) keeps the product's unrounded value and leaves up to half an ulp of g_diff — up to
    ~10⁷ × g — where the reference leaves at most about |g|.
    """
    sig = torch.sigmoid(means * 10)
    g_mu = grad_z0.float()
    if grad_diff is not None:
        g_mu = (g_mu + grad_diff) - grad_diff
    return ((g_mu * loc_scale) * (1 - sig)) * sig * 10  # autograd's sigmoid_backward order


def rank_one_tanh_grad(grad_rows: Tensor, w3_colsum: Tensor, h2: Tensor) -> Tensor:
    """(g ⊗ 1_m) @ W3 ⊙ (1 − h2²) = g ⊗ colsum(W3) ⊙ (1 − h2²), in the dtype of ``h2``."""
    h2f = h2.float()
    return (grad_rows.unsqueeze(-1) * w3_colsum * (1 - h2f * h2f)).to(h2.dtype)


def atom_max(missing: Tensor, values: Tensor) -> Tensor:
    """v_b(S_a) = max_k 1[atom k fits]·b_k from the ``[B·K, A]`` counts of missing items."""
    n_val, n_atoms = values.shape
    fits = (missing.view(n_val, n_atoms, -1) == 0).to(values.dtype)
    return (fits * values.unsqueeze(-1)).amax(dim=1)


# ----------------------------------------------------------------------------- kernels


class _Kernel:
    """One pointwise function, compiled on first use if asked; eager after a failure (for
    the rest of that call: the step and trainer then switch to the plain path)."""

    def __init__(self, owner: Kernels, fn: Callable):
        self.owner, self.fn, self.compiled = owner, fn, None
        if owner.compile:
            self.compiled = torch.compile(fn, dynamic=False, fullgraph=True)

    def __call__(self, *args):
        if self.compiled is not None and self.owner.eager_reason is None:
            try:
                return self.compiled(*args)
            except Exception as err:  # noqa: BLE001 - any compiler failure: eager from now on
                reason = f"torch.compile failed ({type(err).__name__}: {err})"[:300]
                self.owner.eager_reason = reason
                logger.warning("{}; the fused kernels run eagerly", reason)
        return self.fn(*args)


class Kernels:
    """The pointwise functions, eager (``compile=False``) or through ``torch.compile``."""

    def __init__(self, compile: bool = False):
        self.compile = compile
        self.eager_reason: str | None = None
        self.prepare = _Kernel(self, prepare)
        self.end_points = _Kernel(self, end_points)
        self.density_grad = _Kernel(self, density_grad)
        self.means_grad = _Kernel(self, means_grad)
        self.rank_one_tanh_grad = _Kernel(self, rank_one_tanh_grad)
        self.atom_max = _Kernel(self, atom_max)

    def live(self) -> Kernels | None:
        """These kernels, or None (the plain path) once compiling them has failed: the eager
        fused functions are slower than the plain path (BENCHMARKS.md), so no fallback."""
        return None if self.eager_reason is not None else self

    @property
    def description(self) -> str:
        if not self.compile:
            return "fused (eager pointwise)"
        if self.eager_reason:
            return f"fused (compile failed, eager pointwise: {self.eager_reason})"
        return "fused (torch.compile'd pointwise)"


_EAGER = Kernels(compile=False)
_COMPILED: Kernels | None = None


def kernels_for(mode: str) -> Kernels | None:
    """``plain``: None (Menu.lotteries); ``fused``: eager pointwise; ``compiled``: one shared
    set of compiled kernels per process (compiled once per shape), or None once compiling
    has failed (the step that saw the failure finishes with the eager functions)."""
    global _COMPILED
    if mode not in KERNEL_MODES:
        raise ValueError(f"kernels must be one of {KERNEL_MODES}, got {mode!r}")
    if mode == "plain":
        return None
    if mode == "fused":
        return _EAGER
    if _COMPILED is None:
        _COMPILED = Kernels(compile=True)
    return _COMPILED.live()


# ----------------------------------------------------------------------------- autograd


def _network_weights(field: VelocityField, dtype: torch.dtype) -> list[Tensor]:
    out = []
    for layer in (field.fc1, field.fc2, field.fc3):
        out += [layer.weight.to(dtype), layer.bias.to(dtype)]
    return out


def _tanh_backward(grad: Tensor, y: Tensor) -> Tensor:
    """grad ⊙ (1 − y²) as autograd computes it for tanh (its kernel, its rounding)."""
    return torch.ops.aten.tanh_backward(grad, y)


class _FusedPoints(torch.autograd.Function):
    """(Σ log N ``[J, D]``, ΣQ·∫σ ``[J, D]``, 1 − S ``[J·D, m]``) with a gradient for M."""

    @staticmethod
    def forward(ctx, means, eps, std, field, n_steps, q_dtype, lacks_dtype, exact, kernels, a, b):
        J, D, m = means.shape
        with torch.no_grad():
            sigmas, int_sigma = sigma_grid_integral(field, n_steps, means)
            step_sigmas = torch.stack([s.reshape(()) / n_steps for s in sigmas])
            z0, z0_net, log_p0 = kernels.prepare(means, eps, std, a, b, q_dtype)
            z0 = z0.reshape(J * D, m)
            w1, b1, w2, b2, w3, b3 = _network_weights(field, q_dtype)
            h1 = torch.tanh(torch.addmm(b1, z0_net.reshape(J * D, m), w1.t()))
            h2 = torch.tanh(torch.addmm(b2, h1, w2.t()))
            q = torch.addmm(b3, h2, w3.t())
            lacks, log_det = kernels.end_points(z0, q, step_sigmas, int_sigma, lacks_dtype)
        ctx.save_for_backward(means, eps, std, h1, h2, w1, w2, w3, int_sigma)
        ctx.kernels, ctx.exact, ctx.a, ctx.b = kernels, exact, a, b
        ctx.mark_non_differentiable(lacks)
        return log_p0, log_det.reshape(J, D), lacks

    @staticmethod
    def backward(ctx, grad_log_p0, grad_log_det, _grad_lacks):
        means, eps, std, h1, h2, w1, w2, w3, int_sigma = ctx.saved_tensors
        kernels = ctx.kernels
        J, D, m = means.shape
        if grad_log_p0 is None:
            grad_log_p0 = means.new_zeros(J, D)
        if grad_log_det is None:
            grad_log_det = means.new_zeros(J, D)
        rows = grad_log_det.reshape(J * D) * int_sigma  # ∂L/∂Q, the same on every item
        if h2.dtype == torch.float32:  # the plain path's matrix product, its rounding
            g_q = rows.unsqueeze(-1).expand(J * D, m).contiguous()
            g_pre2 = _tanh_backward(g_q @ w3, h2)
        else:  # low precision: the exact rank-one product, rounded once
            g_pre2 = kernels.rank_one_tanh_grad(rows, w3.float().sum(dim=0), h2)
        g_h1 = g_pre2 @ w2
        g_pre1 = _tanh_backward(g_h1, h1)
        g_z0 = (g_pre1 @ w1).reshape(J, D, m)
        g_diff = None
        if not ctx.exact:  # two kernels: the sum must read g_diff from memory (means_grad)
            g_diff = kernels.density_grad(means, eps, std, grad_log_p0, ctx.a, ctx.b)
        g_means = kernels.means_grad(means, g_z0, g_diff, ctx.b)
        return g_means, None, None, None, None, None, None, None, None, None, None


@dataclass(frozen=True)
class FusedLotteries:
    """What a training step needs of :class:`bundleflow.maths.menu.Lotteries`.

    ``lacks`` is 1 − S ``[J·D, m]`` in the oracle's inclusion dtype (exact 0/1);
    ``alpha`` ``[J, D]`` carries the gradient to M and w.
    """

    log_p0: Tensor
    log_mix: Tensor
    log_det: Tensor
    alpha: Tensor
    lacks: Tensor
    shape: tuple[int, int, int]

    @property
    def bundles(self) -> Tensor:
        """S ``[J, D, m]`` as float32 (a new tensor)."""
        return bundles_from_lacks(self.lacks, self.shape)


def bundles_from_lacks(lacks: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """S = 1 − (1 − S) as float32, reshaped to ``shape`` (``[J, D, m]``)."""
    return (1 - lacks.float()).reshape(shape)


def fused_lotteries(
    menu,
    field: VelocityField,
    mix_temp: float | Tensor,
    eps: Tensor,
    *,
    n_steps: int = 5,
    exact_density_grad: bool = False,
    q_dtype: torch.dtype | None = None,
    lacks_dtype: torch.dtype | None = None,
    kernels: Kernels | None = None,
) -> FusedLotteries:
    """The fast path of :meth:`Menu.lotteries` with fused pointwise work (see the module).

    ``lacks_dtype``: dtype of 1 − S, by default the oracle's inclusion dtype (bf16 on CUDA).
    """
    if any(p.requires_grad for p in field.parameters()):
        raise ValueError("the fused path needs a frozen flow (freeze_flow)")
    kernels = kernels or _EAGER
    q_dtype = q_dtype or torch.float32
    lacks_dtype = lacks_dtype or default_inclusion_dtype(menu.means.device)
    log_p0, log_det, lacks = _FusedPoints.apply(
        menu.means,
        eps,
        menu.std,
        field,
        n_steps,
        q_dtype,
        lacks_dtype,
        exact_density_grad,
        kernels,
        menu.loc_offset,
        menu.loc_scale,
    )
    log_mix = menu.log_mixture_weights(mix_temp)
    _, alpha = support_weights(log_p0, log_mix, log_det)
    return FusedLotteries(log_p0, log_mix, log_det, alpha, lacks, tuple(menu.means.shape))


def fused_utilities(
    lot: FusedLotteries, prices: Tensor, valuations: Tensor, kernels: Kernels | None = None
) -> Tensor:
    """u ``[B, J]`` as :func:`bundleflow.maths.menu.lottery_utilities`, from 1 − S directly."""
    J, D, m = lot.shape
    if valuations.dim() == 2:  # additive: no oracle, the plain formula on S
        return lottery_utilities(lot.bundles, lot.alpha, prices, valuations)
    epilogue = None if kernels is None else kernels.atom_max
    values = xor_values_from_lacks(valuations, lot.lacks, epilogue=epilogue)  # (B, J·D)
    values = values.view(-1, J, D).to(lot.alpha.dtype)
    return (values * lot.alpha).sum(dim=-1) - prices
