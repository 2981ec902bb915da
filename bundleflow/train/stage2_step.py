"""One Stage-2 training step as a callable: eager, CUDA-graph captured, or torch.compile'd.

A step (fixed by issue 7): fresh noise ε, Q at all J·D support points, bundles recomputed,
the value oracle on a fresh batch, backward, optimizer step; nothing is cached across
steps. The numerics are those of :meth:`Menu.lotteries`, :meth:`Menu.utilities` and
:func:`soft_revenue`, unchanged (:func:`stage2_loss` only composes them); the modes differ
in how the kernels are launched:

- ``eager``: plain PyTorch (the only mode on CPU).
- ``graph`` (CUDA): the whole step — batch index and ε drawn on the device by the default
  CUDA generator (graph-safe philox), forward, backward and a fused, capturable Adam step —
  is captured once into a CUDA graph after ``warmup`` eager steps and replayed. λ and the
  mixture temperature live in 0-d device tensors filled before each replay. On an H100 the
  eager step is launch-bound (profile: 4.15 ms per step, 1.27 ms of kernels), which is what
  replaying removes.
- ``compile``: :func:`stage2_loss` under ``torch.compile(mode="reduce-overhead")``; if
  compilation fails the step runs eagerly and says why (``eager_reason``).

``tf32=True`` lets fp32 matrix products in the step (the flow network) use TF32 tensor
cores; the bench checks parity against the float32 reference before timing it.

Every call performs exactly one optimizer step (warm-up calls included), so a trainer can
use :class:`Stage2Step` in place of its loop body.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
from loguru import logger
from torch import Tensor

from bundleflow.evaluation.posted import PostedPrices
from bundleflow.maths.adam import CompiledAdam
from bundleflow.maths.flow import IntegratorPath, VelocityField
from bundleflow.maths.fused import (
    Kernels,
    bundles_from_lacks,
    fused_lotteries,
    fused_utilities,
    kernels_for,
)
from bundleflow.maths.menu import Menu
from bundleflow.maths.revenue import sharded_soft_revenue, soft_revenue
from bundleflow.system.distributed import Comm

StepMode = Literal["auto", "eager", "graph", "compile"]
STEP_MODES = ("auto", "eager", "graph", "compile")


def stage2_loss(
    menu: Menu,
    flow: VelocityField,
    valuations: Tensor,
    inv_temp: float | Tensor,
    mix_temp: float | Tensor,
    eps: Tensor,
    *,
    n_steps: int = 5,
    path: IntegratorPath = "fast",
    exact_density_grad: bool = False,
    q_dtype: torch.dtype | None = None,
    posted: PostedPrices | None = None,
    kernels: Kernels | None = None,
    bundle_temp: float | None = None,
) -> tuple[Tensor, Tensor]:
    """The training loss −R̃ and the bundles ``[J, D, m]`` for given noise and valuations.

    ``posted``: posted prices offered as option J (its column is computed from
    ``valuations`` here, so a captured step sees each replay's batch).
    ``kernels``: the fused per-point work (:mod:`bundleflow.maths.fused`; fast path only); the
    second value is then 1 − S ``[J·D, m]`` in the oracle's dtype (see :func:`as_bundles`).
    ``bundle_temp``: straight-through gradient to the bundles (``menu.bundle_grad``; plain
    kernels only — the fused backward carries the trace term's gradient alone).
    """
    if bundle_temp is not None and kernels is not None:
        raise ValueError("bundle_temp needs the plain kernels (kernels=None)")
    extra = None if posted is None else posted.outcome(valuations)
    kw = {"n_steps": n_steps, "exact_density_grad": exact_density_grad, "q_dtype": q_dtype}
    utilities, second = menu_utilities(
        menu, flow, valuations, mix_temp, eps, path=path, kernels=kernels,
        bundle_temp=bundle_temp, **kw,
    )  # fmt: skip
    return -soft_revenue(utilities, menu.prices, inv_temp, extra), second


def menu_utilities(
    menu: Menu,
    flow: VelocityField,
    valuations: Tensor,
    mix_temp: float | Tensor,
    eps: Tensor,
    *,
    path: IntegratorPath,
    kernels: Kernels | None,
    bundle_temp: float | None,
    **kw,
) -> tuple[Tensor, Tensor]:
    """The utilities ``[B, J]`` of the menu's elements and the step's second value (the
    bundles, or 1 − S from the fused kernels): the one composition of the lotteries with the
    value oracle, used by the whole step and by a shard's part of it. ``kw``: ``n_steps``,
    ``exact_density_grad``, ``q_dtype``."""
    if kernels is not None and path == "fast":
        fused = fused_lotteries(menu, flow, mix_temp, eps, kernels=kernels, **kw)
        return fused_utilities(fused, menu.prices, valuations, kernels), fused.lacks
    lot = menu.lotteries(flow, mix_temp, eps=eps, path=path, bundle_temp=bundle_temp, **kw)
    return menu.utilities(lot, valuations), lot.bundles


@dataclass(frozen=True)
class Layout:
    """Where this process's part of the step lives among several processes.

    ``single`` (one process), ``shard`` (this rank owns menu elements ``[lo, lo + J_local)``
    of ``n_elements`` and the whole batch; the softmax over all elements needs only
    all-reduces of ``[B]``-sized vectors, see :func:`sharded_soft_revenue`) or ``replicate``
    (the whole menu and ``1/world`` of the batch; gradients averaged). Every rank draws the
    step's whole ``[J, D, m]`` noise and whole batch from the same seeded generator and takes
    its part, so any layout sees the same draws.
    """

    parallel: str = "single"
    comm: Comm = field(default_factory=Comm)
    lo: int = 0
    n_elements: int | None = None  # J over all ranks (None: the menu's own size)


def as_bundles(second: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """S ``[J, D, m]`` from :func:`stage2_loss`'s second value (bundles, or 1 − S if fused)."""
    if second.dim() == 3:
        return second
    return bundles_from_lacks(second, shape)


@contextlib.contextmanager
def tf32_matmul(enabled: bool) -> Iterator[None]:
    """Allow (or forbid) TF32 for fp32 matrix products inside the block, then restore."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def settle_capture(device: torch.device) -> None:
    """Call once after capturing a CUDA graph, before its first replay. Before capture begins,
    torch resets the RNG generators' graph-side seed and offset tensors with kernels on the
    capture stream; a replay fills those tensors on the current stream and launches there, so
    without this wait the capture stream's reset could land between the two and the first
    replay draw from offset 0. On an idle GPU it never did; with seven other processes on the
    H100 the first replayed step drew other numbers than the eager step (BENCHMARKS.md,
    issue 27's sixth pass, "A race in the CUDA-graph steps")."""
    torch.cuda.synchronize(device)


def resolve_mode(
    mode: str, device: torch.device, modes: tuple[str, ...] = STEP_MODES, where: str = "the menu"
) -> str:
    """``auto``: graph on CUDA, eager elsewhere. ``graph`` needs CUDA. ``modes``: the step's
    modes (the Stage-1 step has no ``compile``); ``where``: what lives on ``device``."""
    if mode not in modes:
        raise ValueError(f"mode must be one of {modes}, got {mode!r}")
    if mode == "auto":
        return "graph" if device.type == "cuda" else "eager"
    if mode == "graph" and device.type != "cuda":
        raise ValueError(f"mode 'graph' needs a CUDA device, {where} is on {device}")
    return mode


def make_optimizer(
    menu: Menu, groups: list[dict] | None, mode: str, *, kernels: str = "plain"
) -> torch.optim.Adam:
    """Adam as the step needs it: on CUDA capturable for ``graph``, and compiled into one
    elementwise kernel per parameter with the compiled kernels (:mod:`bundleflow.maths.adam`:
    torch's fused Adam under-fills the GPU on the support locations), else torch's fused
    Adam. On the CPU torch's Adam."""
    device = menu.means.device
    groups = groups or [{"params": list(menu.parameters()), "lr": 0.3}]
    if device.type != "cuda":
        return torch.optim.Adam(groups)
    capturable = resolve_mode(mode, device) == "graph"
    if kernels == "compiled":
        return CompiledAdam(groups, capturable=capturable)
    return torch.optim.Adam(groups, fused=True, capturable=capturable)


@dataclass(frozen=True)
class StepOptions:
    """How the step runs, decided once from the plan and the config (:meth:`from_run`).

    ``batch_size``: valuations per step. ``n_steps``: Euler steps of the flow. ``path``: the
    integrator (``fast`` or ``reference``). ``mode``: ``auto`` | ``eager`` | ``graph`` |
    ``compile`` (see the module docstring). ``kernels``: ``plain`` | ``fused`` | ``compiled``.
    ``tf32``: TF32 for fp32 matrix products (CUDA only). ``exact_density_grad``: the exact
    gradient of the density term (method.md). ``q_dtype``: the flow network's precision
    (None: fp32; fp16 adds a gradient scaler, eager steps only). ``bundle_temp``: T of the
    straight-through gradient to the bundles (``menu.bundle_grad``; needs ``plain``
    kernels), or None (the reference: no gradient through S). ``warmup``: eager calls
    before a graph is captured.
    """

    batch_size: int
    n_steps: int = 5
    path: IntegratorPath = "fast"
    mode: StepMode = "auto"
    kernels: str = "plain"
    tf32: bool = False
    exact_density_grad: bool = False
    q_dtype: torch.dtype | None = None
    bundle_temp: float | None = None
    warmup: int = 3

    @classmethod
    def from_run(cls, cfg, plan) -> StepOptions:
        """The options of a run's step: the plan's mode, kernels and precision, the config's
        batch, integrator and gradient settings."""
        s2, menu = cfg.stage2, cfg.menu
        return cls(
            batch_size=s2.batch_size,
            n_steps=cfg.flow.euler_steps,
            path=s2.path,
            mode=plan.step_mode.value,
            kernels=plan.kernels.value,
            tf32=s2.tf32,
            exact_density_grad=s2.exact_density_grad,
            q_dtype=plan.q_dtype,
            bundle_temp=menu.bundle_temp if menu.bundle_grad != "none" else None,
        )


Batches = Tensor | Callable[[int, torch.Generator | None], Tensor]


class Stage2Step:
    """The one Stage-2 step: the trainer, the bench and the profiler all run this.

    Draws, in this order, from ``generator`` (None: the default generator of the menu's
    device; ``graph`` mode always uses the default CUDA generator, which the graph advances
    exactly as eager calls do): the batch (indices into the pool, or fresh valuations), then
    the step's noise ε ``[J, D, m]`` over all J elements. So the same
    seed gives the same draws in every mode and layout, and a checkpoint of the generator's
    state resumes them exactly.

    Args:
        menu, flow: the menu being trained (this rank's elements under ``shard``) and the
            frozen flow (same device).
        optimizer: an optimizer over the menu's parameters; for ``graph`` it must be
            capturable (:func:`make_optimizer` builds a fused, capturable Adam).
        batches: ``[N, K, m+1]`` or ``[N, m]`` training valuations on the device (each step
            draws ``batch_size`` of them uniformly with replacement), or a function
            ``(size, generator) -> valuations`` drawing fresh ones (additive data).
        options: how it runs (:class:`StepOptions`; an int is a batch size with defaults).
        generator: a generator on the menu's device for eager/compile modes (``graph``
            uses the default CUDA generator: seed it with ``torch.cuda.manual_seed``).
        posted: posted prices offered beside the menu as option J (normalised money).
        layout: this process's part under several processes (:class:`Layout`).

    After a call, ``last_eps``, ``last_batch``, ``last_bundles`` hold the step's inputs and
    bundles, and the parameters' ``.grad`` its gradients (used by the parity check). In
    ``graph`` mode these are the graph's static buffers: overwritten by the next step.
    """

    def __init__(
        self,
        menu: Menu,
        flow: VelocityField,
        optimizer: torch.optim.Optimizer,
        batches: Batches,
        options: StepOptions | int,
        *,
        generator: torch.Generator | None = None,
        posted: PostedPrices | None = None,
        layout: Layout | None = None,
    ):
        opts = StepOptions(options) if isinstance(options, int) else options
        self.options = opts
        self.device = menu.means.device
        self.mode = resolve_mode(opts.mode, self.device)
        self.layout = layout or Layout()
        pool = batches if isinstance(batches, Tensor) else None
        self._check(menu, optimizer, pool, generator, opts)
        self.menu, self.flow, self.optimizer, self.pool = menu, flow, optimizer, pool
        self.sample = None if pool is not None else batches
        self.scaler = None
        if opts.q_dtype == torch.float16:
            self.scaler = torch.amp.GradScaler(self.device.type)
        self.batch_size, self.n_steps, self.path = opts.batch_size, opts.n_steps, opts.path
        self.tf32 = opts.tf32 and self.device.type == "cuda"
        self.exact_density_grad, self.q_dtype = opts.exact_density_grad, opts.q_dtype
        self.warmup = max(1, opts.warmup)
        self.generator = generator
        self.posted = None if posted is None else posted.to(self.device)
        self.bundle_temp = opts.bundle_temp
        self.kernel_mode = opts.kernels
        self.kernels = kernels_for(opts.kernels) if opts.path == "fast" else None
        self.calls = 0
        self._eager_reason: str | None = None
        self._graph: torch.cuda.CUDAGraph | None = None
        self._static: tuple[Tensor, Tensor, Tensor, Tensor] | None = None
        # λ and τ as 0-d device tensors in graph/compile modes: no recapture or recompile
        # when the schedule changes them.
        self._inv = torch.zeros((), device=self.device)
        self._mix = torch.zeros((), device=self.device)
        self._loss_fn = stage2_loss
        if self.mode == "compile":
            self._loss_fn = torch.compile(stage2_loss, mode="reduce-overhead")
        self.last_eps: Tensor | None = None
        self.last_batch: Tensor | None = None
        self._last_second: Tensor | None = None

    def _check(self, menu: Menu, optimizer, pool: Tensor | None, generator, opts: StepOptions):
        """Refuse combinations the step cannot run (resolve_plan never builds them)."""
        if self.mode == "graph":
            if generator is not None:
                raise ValueError("graph mode draws from the default CUDA generator; pass None")
            if not all(g.get("capturable", False) for g in optimizer.param_groups):
                raise ValueError(
                    "graph mode needs a capturable optimizer (Adam(..., capturable=True)); "
                    "see make_optimizer"
                )
            fp16 = opts.q_dtype == torch.float16
            if fp16 or self.layout.comm.active or pool is None:
                raise ValueError("graph mode needs one process, a pool and no gradient scaler")
        if pool is not None and pool.device != self.device:
            raise ValueError(f"pool is on {pool.device}, the menu on {self.device}")
        if opts.bundle_temp is not None and opts.kernels != "plain":
            raise ValueError(
                "bundle_temp needs kernels='plain': the fused backward has no path from the "
                "bundles to M (resolve_plan chooses plain kernels for menu.bundle_grad)"
            )
        if getattr(menu, "lottery_weights", "density") != "density" and opts.kernels != "plain":
            raise ValueError(
                "lottery_weights='mixture' needs kernels='plain': the fused kernels compute "
                "density weights (resolve_plan chooses plain kernels for it)"
            )

    @property
    def last_bundles(self) -> Tensor | None:
        """The last step's bundles ``[J, D, m]`` (a new tensor when the kernels are fused)."""
        if self._last_second is None:
            return None
        return as_bundles(self._last_second, self.menu.means.shape)

    def _live_kernels(self) -> Kernels | None:
        """The fused kernels, or None (plain) once their compilation has failed: the eager
        fused form is slower than the plain one (BENCHMARKS.md), so it is no fallback."""
        return None if self.kernels is None else self.kernels.live()

    @property
    def eager_reason(self) -> str | None:
        """Why ``compile`` (the step or the fused kernels) runs eagerly, if it does."""
        if self._eager_reason is not None:
            return self._eager_reason
        return None if self.kernels is None else self.kernels.eager_reason

    @property
    def precision(self) -> str:
        oracle = "bf16 inclusion mask (exact)" if self.device.type == "cuda" else "fp32 oracle"
        if self.q_dtype in (torch.bfloat16, torch.float16):
            flow = f"flow network in {str(self.q_dtype).removeprefix('torch.')} (Q cast to fp32)"
        else:
            flow = "TF32 matmuls" if self.tf32 else "float32 (TF32 off)"
        kernels = "plain kernels" if self._live_kernels() is None else self.kernels.description
        if self.kernels is not None and self._live_kernels() is None:
            kernels = f"plain kernels ({self.kernels.eager_reason})"
        adam = "compiled Adam" if isinstance(self.optimizer, CompiledAdam) else "Adam"
        if getattr(self.optimizer, "eager_reason", None):
            adam = f"Adam run eagerly ({self.optimizer.eager_reason})"
        return f"{flow}; {oracle}; fp32 softmax/{adam}; {kernels}"

    # ------------------------------------------------------------------ one step

    def _draw(self) -> tuple[Tensor, Tensor]:
        """This rank's ε and part of the batch (the class says in which order they're drawn)."""
        layout, gen = self.layout, self.generator
        if self.pool is not None:
            index = torch.randint(
                self.pool.shape[0], (self.batch_size,), device=self.device, generator=gen
            )
            batch = self.pool[index]
        else:
            batch = self.sample(self.batch_size, gen)
        if layout.parallel == "replicate":
            part = self.batch_size // layout.comm.world
            batch = batch[layout.comm.rank * part : (layout.comm.rank + 1) * part]
        J = layout.n_elements or self.menu.means.shape[0]
        shape = (J, *self.menu.means.shape[1:])
        eps = torch.randn(shape, generator=gen, device=self.device, dtype=self.menu.means.dtype)
        if layout.parallel == "shard":
            eps = eps[layout.lo : layout.lo + self.menu.means.shape[0]]
        return eps, batch

    def _loss(self, batch, eps, inv_temp, mix_temp) -> tuple[Tensor, Tensor, Tensor]:
        """(what to differentiate, −R̃ to report, bundles or 1 − S)."""
        kw = {
            "n_steps": self.n_steps,
            "exact_density_grad": self.exact_density_grad,
            "q_dtype": self.q_dtype,
        }
        if self.layout.parallel != "shard":
            loss, second = self._loss_fn(
                self.menu, self.flow, batch, inv_temp, mix_temp, eps, path=self.path,
                posted=self.posted, kernels=self._live_kernels(),
                bundle_temp=self.bundle_temp, **kw,
            )  # fmt: skip
            return loss, loss, second
        utilities, second = menu_utilities(
            self.menu, self.flow, batch, mix_temp, eps, path=self.path,
            kernels=self._live_kernels(), bundle_temp=self.bundle_temp, **kw,
        )  # fmt: skip
        extra = None if self.posted is None else self.posted.outcome(batch)
        surrogate, revenue = sharded_soft_revenue(
            utilities, self.menu.prices, inv_temp, self.layout.comm.all_reduce, extra
        )
        return -surrogate, -revenue, second

    def _update(self, loss: Tensor) -> None:
        """Backward, gradient averaging under ``replicate``, the optimizer step."""
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        if self.layout.parallel == "replicate":  # average gradients: one flat all-reduce
            comm = self.layout.comm
            grads = [p.grad for p in self.menu.parameters() if p.grad is not None]
            flat = torch.cat([g.reshape(-1) for g in grads])
            comm.all_reduce(flat).div_(comm.world)
            offset = 0
            for g in grads:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

    def _body(self, inv_temp, mix_temp) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        eps, batch = self._draw()
        with tf32_matmul(self.tf32) if self.device.type == "cuda" else contextlib.nullcontext():
            loss, reported, second = self._loss(batch, eps, inv_temp, mix_temp)
            self._update(loss)
        return reported.detach(), eps, batch, second

    def __call__(self, inv_temp: float, mix_temp: float) -> Tensor:
        """One optimizer step at inverse temperature λ and mixture temperature τ.

        Returns the step's loss as a fresh 0-d device tensor (no host synchronisation).
        """
        if self.mode == "eager":
            self.optimizer.zero_grad(set_to_none=True)
            out = self._body(inv_temp, mix_temp)
        elif self.mode == "compile":
            out = self._compiled_call(inv_temp, mix_temp)
        else:
            out = self._graph_call(inv_temp, mix_temp)
        self.calls += 1
        loss, self.last_eps, self.last_batch, self._last_second = out
        return loss.clone() if self.mode == "graph" else loss

    def _compiled_call(self, inv_temp, mix_temp):
        self._inv.fill_(inv_temp)
        self._mix.fill_(mix_temp)
        self.optimizer.zero_grad(set_to_none=True)
        if self._loss_fn is stage2_loss:
            return self._body(inv_temp, mix_temp)
        try:
            return self._body(self._inv, self._mix)
        except Exception as err:  # noqa: BLE001 - any compiler failure: fall back to eager
            self._eager_reason = f"torch.compile failed ({type(err).__name__}: {err})"[:300]
            logger.warning("{}; the step runs eagerly", self._eager_reason)
            self._loss_fn = stage2_loss
            self.optimizer.zero_grad(set_to_none=True)
            return self._body(inv_temp, mix_temp)

    def _graph_call(self, inv_temp, mix_temp):
        self._inv.fill_(inv_temp)
        self._mix.fill_(mix_temp)
        if self._graph is None and self.calls < self.warmup:
            # Eager warm-up on a side stream (lazy init of cuBLAS, Adam state, allocator).
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self.optimizer.zero_grad(set_to_none=True)
                out = self._body(self._inv, self._mix)
            torch.cuda.current_stream(self.device).wait_stream(side)
            return out
        if self._graph is None:
            self.optimizer.zero_grad(set_to_none=True)  # grads get allocated in the graph
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._static = self._body(self._inv, self._mix)
            settle_capture(self.device)
            self._graph = graph
        self._graph.replay()
        assert self._static is not None
        return self._static
