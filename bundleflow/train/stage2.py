"""Stage 2: learn the menu on soft revenue, select on validation hard revenue, freeze it."""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from loguru import logger

from bundleflow.baselines import fit_grand_bundle_price
from bundleflow.checkpoint import (
    latest,
    load_optimizer_tensors,
    optimizer_tensors,
    prune,
    read_checkpoint,
    replace_checkpoint,
    write_checkpoint,
)
from bundleflow.config import Config, to_dict
from bundleflow.distributed import Comm
from bundleflow.errors import BundleflowError
from bundleflow.fallback import PostedPrices, fit_posted_prices
from bundleflow.fast_step import Stage2Step, stage2_loss
from bundleflow.flow import VelocityField
from bundleflow.fused import fused_lotteries, fused_utilities, kernels_for, resolve_kernels
from bundleflow.health import FiniteGuard
from bundleflow.mechanism import FrozenMechanism
from bundleflow.menu import Menu, freeze_flow
from bundleflow.progress import ProgressBar
from bundleflow.schedule import InvTempSchedule
from bundleflow.telemetry import gpu_status_line
from bundleflow.train.data import RunData
from bundleflow.train.run import Run
from bundleflow.train.signals import StopRequest

MECHANISM_FILE = "mechanism.safetensors"
CHECKPOINTS = "checkpoints"
BEST = "best"


@dataclass
class Stage2Result:
    steps: int
    best_step: int
    best_val_revenue: float
    stop_reason: str
    wall_time: float
    mechanism: FrozenMechanism | None  # None: stopped by a signal, or not the main process


# M for a support point that sits on the corner 1: μ = a + b·sigmoid(10·3) ≈ a + b.
CORNER_LOGIT = 3.0


def build_menu(cfg: Config, data: RunData) -> Menu:
    """The initial menu; with ``menu.grand_bundle_element`` element 0 is the grand bundle
    at the grand-bundle price fitted on the training split (normalised money)."""
    gen = torch.Generator().manual_seed(cfg.stage2.seed)
    m = cfg.menu
    menu = Menu(
        data.n_items,
        m.size,
        m.support,
        loc_offset=m.loc_offset,
        loc_scale=m.loc_scale,
        price_scale=m.price_init,
        generator=gen,
    )
    if m.grand_bundle_element:
        price = fit_grand_bundle_price(data.train_user) / data.scale
        with torch.no_grad():
            menu.means[0].fill_(CORNER_LOGIT)
            menu.prices[0] = price
        logger.info(
            "menu: element 0 starts as the grand bundle at price {:.4g}", price * data.scale
        )
    return menu


def build_fallback(cfg: Config, data: RunData) -> PostedPrices | None:
    """``menu.fallback`` fitted on the training split, in normalised money (float32)."""
    if cfg.menu.fallback == "none":
        return None
    posted, record = fit_posted_prices(data.train_user, cfg.menu.fallback)
    logger.info(
        "menu: fallback {} pricing (training revenue {})",
        record["kind"],
        ", ".join(f"{k} {v:.4g}" for k, v in record["train_revenue"].items()),
    )
    return posted.scaled(1.0 / data.scale).to(dtype=torch.float32)


@torch.no_grad()
def price_at_fallback(
    menu: Menu, flow: VelocityField, fallback: PostedPrices, mix_temp: float, eps: torch.Tensor
) -> None:
    """p_j = Σ_d α_jd·c(S_jd): every element weakly worse than the fallback (``eps``: the
    recorded evaluation noise, so the first validation sees these lotteries)."""
    device = next(flow.parameters()).device
    lot = menu.to(device).lotteries(flow, mix_temp, eps=eps.to(device))
    cost = fallback.to(device).bundle_cost(lot.bundles)  # (J, D, m) -> (J, D)
    menu.prices.copy_((lot.alpha * cost).sum(dim=-1).to(menu.prices.device))


def build_optimizer(
    menu: Menu, cfg: Config, device: torch.device, *, capturable: bool = False
) -> torch.optim.Adam:
    """Adam: lr for M and w, a separate (normalised-money) lr for the prices. On CUDA it is
    fused (one kernel, no host sync) and, for the graph step, capturable."""
    groups = [
        {"params": [menu.means, menu.logits], "lr": cfg.stage2.lr},
        {"params": [menu.prices], "lr": cfg.stage2.price_lr},
    ]
    if device.type != "cuda":
        return torch.optim.Adam(groups)
    return torch.optim.Adam(groups, fused=True, capturable=capturable)


def stage2_precision(configured: str | None, device: torch.device) -> tuple[str, str]:
    """(precision of the flow network in Stage 2, where the choice came from).

    ``--mixed-precision`` / ``mixed_precision`` > a real choice made through ``accelerate
    launch --mixed_precision`` or its config file (ACCELERATE_MIXED_PRECISION=fp16|bf16) >
    the measured default: bf16 on CUDA (on an H200: 10% faster steps at m=50, 27% at m=500,
    no test bidder choosing differently on a frozen paper-m50 menu, validation revenue over 3
    seeds not lower; BENCHMARKS.md), fp32 elsewhere. Stage 1, freezing, validation and the
    report stay fp32 unless set explicitly.

    ``accelerate launch`` exports ACCELERATE_MIXED_PRECISION on every launch, ``no`` when
    neither its flag nor its config file chose anything (and ``no`` is what ``accelerate
    config`` writes by default), so ``no`` from there is not a choice: it keeps the measured
    default. ``--mixed-precision no`` (or ``--set mixed_precision=no``) asks for fp32.
    """
    if configured is not None:
        return configured, "bundleflow mixed_precision"
    launched = (os.environ.get("ACCELERATE_MIXED_PRECISION") or "").strip().lower()
    if launched in ("fp16", "bf16"):
        return launched, "accelerate (ACCELERATE_MIXED_PRECISION)"
    default = "bf16" if device.type == "cuda" else "no"
    if launched:
        return default, (
            f"default for {device.type}; accelerate's mixed_precision={launched!r} is its "
            "default, not a choice (--mixed-precision no for fp32)"
        )
    return default, "default for " + device.type


def graph_unavailable(
    device: torch.device, has_pool: bool, accelerator, mixed_precision: str | None = None
) -> str | None:
    """Why the CUDA-graph step cannot run here, or None when it can."""
    if device.type != "cuda":
        return f"the device is {device.type}, not CUDA"
    if not has_pool:
        return "additive runs draw fresh valuations (no device-resident pool)"
    if accelerator is not None and accelerator.num_processes > 1:
        return "several processes (use eager under accelerate launch)"
    if mixed_precision is None and accelerator is not None:
        mixed_precision = accelerator.mixed_precision
    if mixed_precision == "fp16":
        return "fp16 needs a gradient scaler (use bf16 or eager)"
    return None


def build_schedule(cfg: Config) -> InvTempSchedule:
    s = cfg.stage2.inv_temp
    return InvTempSchedule(
        value=s.initial,
        cap=s.cap,
        growth=s.growth,
        reset_value=s.reset_value,
        slow_growth=s.slow_growth,
        interval=s.interval,
        reset_interval=s.reset_interval,
        location_threshold=s.location_threshold,
    )


def eval_noise(menu: Menu, seed: int) -> torch.Tensor:
    """The one recorded noise draw that freezes the menu (validation and the final report)."""
    return torch.randn(menu.means.shape, generator=torch.Generator().manual_seed(seed))


def step_seed(seed: int, stream: str, step: int) -> int:
    """A 63-bit seed for draw ``stream`` at ``step``: the draws are a function of
    (seed, step), not of a generator's history, so runs with any number of processes or
    layouts (and resumed runs) see the same batches and noise."""
    digest = hashlib.blake2b(f"{seed}/{stream}/{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


MIXED_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def flow_dtype(mixed_precision: str | None, device: torch.device) -> torch.dtype | None:
    """The flow network's autocast dtype for ``--mixed-precision`` (None: float32)."""
    if mixed_precision in (None, "no"):
        return None
    if mixed_precision == "fp16" and device.type == "cpu":
        logger.warning("mixed precision fp16 has no effect on the CPU; the flow runs in fp32")
        return None
    return MIXED_DTYPES[mixed_precision]


def menu_like(menu: Menu, state: dict) -> Menu:
    """A menu with ``menu``'s location map holding the tensors of ``state`` (a state dict:
    a shard's rows, all ranks' rows, or a checkpoint's)."""
    return Menu.from_tensors(
        state["means"],
        state["logits"],
        state["std"],
        state["prices"],
        loc_offset=menu.loc_offset,
        loc_scale=menu.loc_scale,
    )


@dataclass
class Stage2Parts:
    """Everything one Stage-2 step touches, built once per run (and by the profiler).

    ``parallel``: ``single`` (one process), ``shard`` (this rank owns menu elements
    ``[lo, hi)`` of ``n_elements`` and the whole batch) or ``replicate`` (the whole menu and
    ``1/world`` of the batch; gradients averaged). ``fallback``: posted prices offered as
    option J (normalised money, on the device), or None.
    """

    flow: VelocityField
    menu: Menu
    optimizer: torch.optim.Optimizer
    schedule: InvTempSchedule
    mix_factor: float
    seed: int
    n_elements: int
    comm: Comm = field(default_factory=Comm)
    parallel: str = "single"
    lo: int = 0
    q_dtype: torch.dtype | None = None
    scaler: object | None = None
    fallback: PostedPrices | None = None
    kernel_mode: str = "plain"
    _noise_gen: torch.Generator | None = None
    _batch_gen: torch.Generator = field(default_factory=torch.Generator)

    @property
    def net(self) -> Menu:
        """The menu itself, also when Accelerate wrapped it."""
        return self.menu.module if hasattr(self.menu, "module") else self.menu

    @property
    def hi(self) -> int:
        return self.lo + self.net.menu_size

    def mix_temp(self) -> float:
        return self.schedule.value * self.mix_factor

    # -- the step's draws: functions of (seed, step), the same under any layout

    def noise(self, step: int) -> torch.Tensor:
        """ε ``[J_local, D, m]``: this rank's rows of the step's ``[J, D, m]`` draw."""
        net = self.net
        if self._noise_gen is None:
            self._noise_gen = torch.Generator(device=net.means.device)
        self._noise_gen.manual_seed(step_seed(self.seed, "noise", step))
        shape = (self.n_elements, *net.means.shape[1:])
        eps = torch.randn(shape, generator=self._noise_gen, device=net.means.device)
        return eps[self.lo : self.hi] if self.parallel == "shard" else eps

    def batch(self, data: RunData, step: int, size: int) -> torch.Tensor:
        """This rank's part of the step's global batch of ``size`` valuations."""
        self._batch_gen.manual_seed(step_seed(self.seed, "batch", step))
        batch = data.batch(size, self._batch_gen, self.net.means.device)
        if self.parallel != "replicate":
            return batch
        part = size // self.comm.world
        return batch[self.comm.rank * part : (self.comm.rank + 1) * part]

    # -- whole-menu views (collectives under ``shard``)

    @torch.no_grad()
    def mean_support_location(self) -> float:
        """The λ reset statistic over all J elements."""
        if self.parallel != "shard":
            return self.net.mean_support_location(self.mix_temp())
        net = self.net
        per_point = net.support_locations().mean(dim=-1)
        local = (net.mixture_weights(self.mix_temp()) * per_point).sum(dim=-1).sum()
        total = self.comm.all_reduce(local.double().reshape(1))
        return float(total) / self.n_elements

    @torch.no_grad()
    def full_menu(self) -> Menu:
        """All J elements (gathered from every rank under ``shard``; else the menu itself)."""
        net = self.net
        if self.parallel != "shard":
            return net
        J = self.n_elements
        return menu_like(
            net, {k: self.comm.all_gather_rows(v, J) for k, v in net.state_dict().items()}
        )

    def full_state(self) -> tuple[dict, dict, dict]:
        """(menu state, optimizer tensors, optimizer rest) for all J elements: checkpoints
        do not depend on the number of processes."""
        opt_tensors, opt_rest = optimizer_tensors(self.optimizer)
        menu_state = dict(self.net.state_dict())
        if self.parallel == "shard":
            menu_state = dict(self.full_menu().state_dict())
            opt_tensors = {
                k: self.comm.all_gather_rows(v, self.n_elements) if v.dim() > 0 else v
                for k, v in opt_tensors.items()
            }
        return menu_state, opt_tensors, opt_rest

    def load_full_state(self, menu_state: dict, opt_tensors: dict, opt_rest: dict) -> None:
        """Restore this rank's rows of a whole-menu checkpoint."""
        device = self.net.means.device
        rows = slice(self.lo, self.hi) if self.parallel == "shard" else slice(None)
        self.net.load_state_dict({k: v[rows].to(device) for k, v in menu_state.items()})
        opt = {}
        for k, v in opt_tensors.items():
            if v.dim() > 0:
                v = v[rows]
            on_device = v.dim() > 0 or getattr(self.optimizer, "defaults", {}).get("fused")
            opt[k] = v.to(device) if on_device else v
        load_optimizer_tensors(self.optimizer, opt, opt_rest)


def setup_stage2(
    cfg: Config,
    flow: VelocityField,
    data: RunData,
    device: torch.device,
    *,
    capturable: bool = False,
    comm: Comm | None = None,
    mixed_precision: str | None = None,
) -> Stage2Parts:
    """Frozen flow, initial menu (this rank's shard of it), optimizer, λ schedule."""
    comm = comm or Comm()
    full = build_menu(cfg, data)  # the same on every rank: one seed
    fallback = build_fallback(cfg, data)
    if fallback is not None and cfg.menu.posted_price_init:
        mix = cfg.stage2.inv_temp.initial * cfg.stage2.inv_temp.mixture_factor
        price_at_fallback(full, flow, fallback, mix, eval_noise(full, cfg.eval.seed))
        logger.info("menu: elements start at the fallback's price of their lottery")
    parallel = cfg.stage2.parallel if comm.active else "single"
    lo = 0
    menu = full
    if parallel == "shard":
        lo, hi = comm.shard(cfg.menu.size)
        if hi == lo:
            raise BundleflowError(
                f"config key 'menu.size': {cfg.menu.size} elements cannot be sharded over "
                f"{comm.world} processes; use fewer processes or stage2.parallel=replicate"
            )
        menu = menu_like(full, {k: v[lo:hi] for k, v in full.state_dict().items()})
    elif parallel == "replicate" and cfg.stage2.batch_size % comm.world:
        raise BundleflowError(
            f"config key 'stage2.batch_size': {cfg.stage2.batch_size} is not divisible by "
            f"{comm.world} processes (stage2.parallel=replicate splits the batch)"
        )
    menu = menu.to(device)
    q_dtype = flow_dtype(mixed_precision, device)
    scaler = None
    if q_dtype == torch.float16:
        scaler = torch.amp.GradScaler(device.type)
    return Stage2Parts(
        flow=freeze_flow(flow).to(device),
        menu=menu,
        optimizer=build_optimizer(menu, cfg, device, capturable=capturable),
        schedule=build_schedule(cfg),
        mix_factor=cfg.stage2.inv_temp.mixture_factor,
        seed=cfg.stage2.seed,
        n_elements=cfg.menu.size,
        comm=comm,
        parallel=parallel,
        lo=lo,
        q_dtype=q_dtype,
        scaler=scaler,
        fallback=None if fallback is None else fallback.to(device),
        kernel_mode=resolve_kernels(cfg.stage2.kernels, device, q_dtype is not None),
    )


def sharded_soft_revenue(
    utilities: torch.Tensor,
    prices: torch.Tensor,
    inv_temp: float,
    comm: Comm,
    extra: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft revenue when each rank holds the utilities ``[B, J_local]`` of its elements.

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
        top = comm.all_reduce(top, "max")
    weights = torch.exp(logits - top[:, None])
    num = weights @ prices  # (B,)
    den = weights.sum(dim=1)
    with torch.no_grad():
        totals = comm.all_reduce(torch.stack([num, den]).detach())
        big_n, big_d = totals[0], totals[1] + torch.exp(-top)
        if extra is not None:
            extra_weight = torch.exp(extra_logit - top)
            big_n = big_n + extra_weight * extra[1].to(big_n.dtype)
            big_d = big_d + extra_weight
    surrogate = (num / big_d - big_n / big_d**2 * den).mean()
    return surrogate, (big_n / big_d).mean()


def step_loss(parts: Stage2Parts, cfg: Config, batch, eps) -> tuple[torch.Tensor, torch.Tensor]:
    """(what to differentiate, −R̃ to report) for one step's batch and noise."""
    s2, net = cfg.stage2, parts.net
    kernels = kernels_for(parts.kernel_mode) if s2.path == "fast" else None
    if parts.parallel != "shard":
        loss, _ = stage2_loss(
            net,
            parts.flow,
            batch,
            parts.schedule.value,
            parts.mix_temp(),
            eps,
            n_steps=cfg.flow.euler_steps,
            path=s2.path,
            exact_density_grad=s2.exact_density_grad,
            q_dtype=parts.q_dtype,
            fallback=parts.fallback,
            kernels=kernels,
        )
        return loss, loss
    lottery_kw = {
        "n_steps": cfg.flow.euler_steps,
        "exact_density_grad": s2.exact_density_grad,
        "q_dtype": parts.q_dtype,
    }
    if kernels is not None:
        fused = fused_lotteries(
            net, parts.flow, parts.mix_temp(), eps, kernels=kernels, **lottery_kw
        )
        utilities = fused_utilities(fused, net.prices, batch, kernels)
    else:
        lot = net.lotteries(parts.flow, parts.mix_temp(), eps=eps, path=s2.path, **lottery_kw)
        utilities = net.utilities(lot, batch)
    extra = None if parts.fallback is None else parts.fallback.outcome(batch)
    surrogate, revenue = sharded_soft_revenue(
        utilities, net.prices, parts.schedule.value, parts.comm, extra
    )
    return -surrogate, -revenue


def train_step(parts: Stage2Parts, cfg: Config, data: RunData, step: int) -> torch.Tensor:
    """One Stage-2 step (the step's batch and ε, loss, backward, optimizer, λ update).

    Returns −R̃ (over the global batch under ``shard``; this rank's part under ``replicate``).
    """
    batch = parts.batch(data, step, cfg.stage2.batch_size)
    loss, reported = step_loss(parts, cfg, batch, parts.noise(step))
    optimizer, scaler = parts.optimizer, parts.scaler
    optimizer.zero_grad(set_to_none=True)
    (scaler.scale(loss) if scaler is not None else loss).backward()
    if parts.parallel == "replicate":  # average gradients: one flat all-reduce
        grads = [p.grad for p in parts.net.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        parts.comm.all_reduce(flat).div_(parts.comm.world)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    parts.schedule.update(step, parts.mean_support_location)
    return reported.detach()


def train_stage2(
    cfg: Config,
    flow: VelocityField,
    data: RunData,
    run: Run,
    device: torch.device,
    *,
    accelerator=None,
    max_steps: int | None = None,
    max_time: float | None = None,
    resume: bool = False,
    show_progress: bool = True,
    mixed_precision: str | None = None,
) -> Stage2Result:
    """The Stage-2 loop; a plain function. Under several processes every rank calls it;
    only the main process logs metrics, evaluates and writes files."""
    s2 = cfg.stage2
    comm = Comm.from_accelerator(accelerator)
    if mixed_precision is None:
        mixed_precision = accelerator.mixed_precision if accelerator is not None else None
    mixed = mixed_precision
    total_steps = max_steps or s2.steps
    max_time = max_time if max_time is not None else s2.max_time
    reason = graph_unavailable(device, data.train is not None, accelerator, mixed)
    if s2.step_mode == "graph" and reason is not None:
        raise BundleflowError(f"config key 'stage2.step_mode': graph is unavailable: {reason}")
    use_graph = s2.step_mode != "eager" and reason is None
    if use_graph:
        torch.cuda.manual_seed(s2.seed + 2)  # the graph draws batches and ε from this generator
    elif s2.step_mode == "auto" and device.type == "cuda":
        logger.info("stage 2: eager steps ({})", reason)
    parts = setup_stage2(
        cfg, flow, data, device, capturable=use_graph, comm=comm, mixed_precision=mixed
    )
    if comm.active:
        logger.info(
            "stage 2: {} processes, parallel={} (this rank: elements {}..{})",
            comm.world,
            parts.parallel,
            parts.lo,
            parts.hi - 1,
        )
    flow, schedule, mix_factor = parts.flow, parts.schedule, parts.mix_factor
    J, D, m = cfg.menu.size, cfg.menu.support, data.n_items
    eps_eval = torch.randn((J, D, m), generator=torch.Generator().manual_seed(cfg.eval.seed))
    eps_eval = eps_eval.to(device)
    state = {
        "step": 0,
        "best_val": float("-inf"),
        "best_step": 0,
        "since_best": 0,
        "wall_before": 0.0,
        "best_mix_temp": schedule.value * mix_factor,
    }
    ckpt_dir = run.dir / CHECKPOINTS
    data_record = {k: data.info.get(k) for k in ("path", "sha256", "money_scale", "kind")}
    if resume:
        rng = _restore(ckpt_dir, parts, state)
        if use_graph and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], device)
    net: Menu = parts.net
    stepper = None
    if use_graph:
        stepper = Stage2Step(
            net,
            flow,
            parts.optimizer,
            data.train,
            s2.batch_size,
            n_steps=cfg.flow.euler_steps,
            path=s2.path,
            mode="graph",
            tf32=s2.tf32,
            exact_density_grad=s2.exact_density_grad,
            q_dtype=parts.q_dtype,
            fallback=parts.fallback,
            kernels=parts.kernel_mode,
        )
        logger.info("stage 2: CUDA-graph step (captured after {} eager steps)", stepper.warmup)
    saved_step = {"resumable": state["step"] if resume else -1}
    best_menu: dict = {}

    guard = FiniteGuard(
        device,
        stage="stage 2",
        all_reduce_min=(lambda t: comm.all_reduce(t, "min")) if comm.active else None,
    )

    def last_good() -> str | None:
        done = saved_step["resumable"]
        return str(ckpt_dir / f"step-{done:09d}") if done >= 0 else None

    def save_resumable() -> None:
        if saved_step["resumable"] == state["step"]:
            return  # this step is already on disk
        guard.update(None, parts.net.parameters())
        guard.check(state["step"], last_good=last_good())  # never checkpoint a diverged state
        menu_state, opt_tensors, opt_rest = parts.full_state()  # collective under shard
        saved_step["resumable"] = state["step"]
        if not run.main_process:
            return
        rng = {"cuda": torch.cuda.get_rng_state(device)} if use_graph else {}
        components = {"menu": menu_state, "optimizer": opt_tensors}
        if rng:
            components["rng"] = rng
        extra = {
            "schedule": schedule.state_dict(),
            "optimizer": opt_rest,
            "loop": state,
            "data": data_record,
            "processes": comm.world,
            "parallel": parts.parallel,
        }
        write_checkpoint(
            ckpt_dir / f"step-{state['step']:09d}",
            components,
            step=state["step"],
            config=to_dict(cfg),
            extra=extra,
        )
        prune(ckpt_dir, s2.keep_checkpoints)

    def save_best(full: Menu, val: float) -> None:
        """The menu with the best validation revenue so far, with the λ it was frozen at."""
        if not run.main_process:
            return
        extra = {
            "mix_temp": state["best_mix_temp"],
            "inv_temp": schedule.value,
            "val_revenue": val,
            "data": data_record,
        }
        replace_checkpoint(
            run.dir / BEST,
            {"menu": dict(full.state_dict())},
            step=state["step"],
            config=to_dict(cfg),
            extra=extra,
        )
        best_menu.clear()
        best_menu.update(
            menu={k: v.detach().cpu().clone() for k, v in full.state_dict().items()}, extra=extra
        )

    def validate() -> tuple[float, Menu]:
        """Hard validation revenue (main process; broadcast) and the whole menu."""
        full = parts.full_menu()  # collective under shard
        val = float("nan")
        if run.main_process:
            mech = FrozenMechanism.freeze(
                full,
                flow,
                schedule.value * mix_factor,
                eps=eps_eval,
                n_steps=cfg.flow.euler_steps,
                fallback=parts.fallback,
            )
            val = mech.revenue(data.val, batch_size=cfg.eval.batch_size) * data.scale
        return comm.broadcast_floats([val], device)[0], full

    def evaluate_now(step: int, elapsed: float) -> bool:
        """Validate, keep the best; True when patience says stop."""
        val, full = validate()
        improved = val > state["best_val"]
        if improved:
            state.update(
                best_val=val,
                best_step=step,
                since_best=0,
                best_mix_temp=schedule.value * mix_factor,
            )
            save_best(full, val)
        else:
            state["since_best"] += 1
        run.metrics(
            stage=2,
            step=step,
            val_revenue=val,
            best_val_revenue=state["best_val"],
            inv_temp=schedule.value,
            wall_time=elapsed,
        )
        logger.info(
            "stage 2 step {}: validation revenue {:.4g}{} (λ {:.4g}, {:.0f}s)",
            step,
            val,
            " *best*" if improved else "",
            schedule.value,
            elapsed,
        )
        gpu = gpu_status_line(device) if run.main_process else None  # None off CUDA
        if gpu is not None:
            logger.info("stage 2 step {}: {}", step, gpu)
        return s2.patience is not None and state["since_best"] >= s2.patience

    def agree(stop: StopRequest, elapsed: float, step: int) -> tuple[bool, bool]:
        """(signal, time): the ranks' common decision; one collective every sync_every steps."""
        out_of_time = max_time is not None and elapsed >= max_time
        if not comm.active:
            return stop.requested, out_of_time
        if step % s2.sync_every:
            return False, False
        flags = torch.tensor(
            [float(stop.requested), float(out_of_time and comm.main)], device=device
        )
        signal_flag, time_flag = comm.all_reduce(flags, "max").tolist()
        return signal_flag > 0, time_flag > 0

    start = time.monotonic()
    bar = ProgressBar(
        total_steps,
        "stage 2",
        enabled=None if show_progress and run.main_process else False,
        unit="steps",
    )
    stop_reason = "max-steps"
    recent_loss = []
    if parts.fallback is not None and state["step"] == 0:
        # The untrained menu beside the fallback is a candidate too: with
        # menu.posted_price_init it earns the fallback's revenue, a floor for selection.
        evaluate_now(0, 0.0)
    with StopRequest() as stop:
        try:
            while state["step"] < total_steps:
                state["step"] += 1
                step = state["step"]
                if stepper is None:
                    recent_loss.append(train_step(parts, cfg, data, step))
                else:
                    recent_loss.append(stepper(schedule.value, parts.mix_temp()))
                    schedule.update(step, parts.mean_support_location)
                guard.update(recent_loss[-1])  # the loss, on the device: no sync
                elapsed = state["wall_before"] + time.monotonic() - start
                if step % s2.log_every == 0:
                    guard.update(recent_loss[-1], net.parameters())
                    guard.check(step, last_good=last_good())  # one sync, agreed by the ranks
                    mean_loss = torch.stack(recent_loss).mean().reshape(1)
                    recent_loss.clear()
                    if parts.parallel == "replicate":
                        mean_loss = comm.all_reduce(mean_loss) / comm.world
                    soft = -float(mean_loss) * data.scale
                    run.metrics(
                        stage=2,
                        step=step,
                        soft_revenue=soft,
                        inv_temp=schedule.value,
                        wall_time=elapsed,
                    )
                    logger.debug(
                        "stage 2 step {} soft revenue {:.4g} λ {:.4g}", step, soft, schedule.value
                    )
                at_eval = step % s2.eval_every == 0 or step == total_steps
                if at_eval and evaluate_now(step, elapsed):
                    stop_reason = "patience"
                    break
                if step % s2.checkpoint_every == 0:
                    state["wall_before"] = elapsed
                    start = time.monotonic()
                    save_resumable()
                bar(step)
                by_signal, by_time = agree(stop, elapsed, step)
                if by_signal:
                    stop_reason = "signal"
                    break
                if by_time:
                    stop_reason = "max-time"
                    break
        except KeyboardInterrupt:  # a second signal: checkpoint what we have (one process)
            bar.close()
            state["wall_before"] += time.monotonic() - start
            if not comm.active:
                save_resumable()
            logger.warning(
                "interrupted at step {}; resume with --resume {}", state["step"], run.dir
            )
            raise
    bar.close()
    state["wall_before"] += time.monotonic() - start
    start = time.monotonic()

    def finished(mechanism: FrozenMechanism | None) -> Stage2Result:
        return Stage2Result(
            steps=state["step"],
            best_step=state["best_step"],
            best_val_revenue=state["best_val"],
            stop_reason=stop_reason,
            wall_time=state["wall_before"],
            mechanism=mechanism,
        )

    if stop_reason == "signal":
        save_resumable()
        logger.warning(
            "stopped by a signal at step {}; checkpoint written; resume with --resume {}",
            state["step"],
            run.dir,
        )
        return finished(None)
    if state["best_val"] == float("-inf"):  # stopped before any evaluation: evaluate now
        evaluate_now(state["step"], state["wall_before"])
    save_resumable()
    mech = None
    if run.main_process:
        if best_menu:
            menu_state, extra = best_menu["menu"], best_menu["extra"]
        else:  # the best menu is from before a resume
            components, manifest = read_checkpoint(run.dir / BEST)
            menu_state, extra = components["menu"], manifest["extra"]
        best = menu_like(net, menu_state).to(device)
        mech = FrozenMechanism.freeze(
            best,
            flow,
            extra["mix_temp"],
            inv_temp=extra.get("inv_temp"),
            eps=eps_eval,
            n_steps=cfg.flow.euler_steps,
            money_scale=data.scale,
            fallback=parts.fallback,
            meta={
                "best_step": state["best_step"],
                "val_revenue": state["best_val"],
                "eval_seed": cfg.eval.seed,
            },
        ).to("cpu")
        mech.save(run.dir / MECHANISM_FILE)
    comm.barrier()
    logger.info(
        "stage 2 done: {} steps ({}), best validation revenue {:.4g} at step {}",
        state["step"],
        stop_reason,
        state["best_val"],
        state["best_step"],
    )
    return finished(mech)


def _restore(ckpt_dir: Path, parts: Stage2Parts, state: dict) -> dict:
    found = latest(ckpt_dir)
    if found is None:
        raise BundleflowError(f"{ckpt_dir}: no checkpoint to resume from")
    components, manifest = read_checkpoint(found)
    extra = manifest["extra"]
    parts.load_full_state(components["menu"], components["optimizer"], extra["optimizer"])
    parts.schedule.load_state_dict(extra["schedule"])
    state.update(extra["loop"])
    logger.info("resumed from {} (step {})", found, state["step"])
    return components.get("rng", {})


def read_mechanism(run_dir: Path) -> FrozenMechanism:
    """A finished run's frozen mechanism; a user error naming what the path lacks otherwise."""
    from bundleflow.train.run import RUN_INFO, runs_root  # already imported with Run

    root = runs_root()
    runs = f"`ls {root}` lists the runs" if root.is_dir() else f"no runs in {root} yet"
    if not run_dir.exists():
        raise BundleflowError(f"{run_dir}: no such run directory; {runs}")
    if not (run_dir / RUN_INFO).is_file():
        raise BundleflowError(f"{run_dir}: not a bundleflow run directory (no {RUN_INFO}); {runs}")
    path = run_dir / MECHANISM_FILE
    if not path.is_file():
        raise BundleflowError(
            f"{run_dir}: no {MECHANISM_FILE}; the run has not finished Stage 2 "
            f"(resume it with `bundleflow train --resume {run_dir}`)"
        )
    return FrozenMechanism.load(path)


def summary_json(result: Stage2Result) -> str:
    return json.dumps({k: getattr(result, k) for k in ("steps", "best_step", "stop_reason")})
