"""Stage 2: learn the menu on soft revenue, select on validation hard revenue, freeze it."""

from __future__ import annotations

import math
import shlex
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from loguru import logger

from bundleflow.errors import BundleflowError
from bundleflow.evaluation.baselines import fit_grand_bundle_price
from bundleflow.evaluation.mechanism import FrozenMechanism
from bundleflow.evaluation.posted import PostedPrices, fit_posted_prices
from bundleflow.maths.flow import VelocityField
from bundleflow.maths.menu import Menu, freeze_flow
from bundleflow.maths.polish import polish_prices
from bundleflow.maths.revenue import hard_choice
from bundleflow.maths.schedule import InvTempSchedule
from bundleflow.paths import runs_root
from bundleflow.system.distributed import Comm
from bundleflow.system.progress import ProgressBar
from bundleflow.system.telemetry import gpu_metrics, gpu_status_line
from bundleflow.train.checkpoint import (
    latest,
    load_optimizer_tensors,
    optimizer_tensors,
    prune,
    read_checkpoint,
    replace_checkpoint,
    write_checkpoint,
)
from bundleflow.train.config import Config, MenuConfig, to_dict
from bundleflow.train.data import RunData, fitted_baselines
from bundleflow.train.health import FiniteGuard
from bundleflow.train.plan import StepPlan
from bundleflow.train.run import RUN_INFO, Run
from bundleflow.train.signals import StopRequest
from bundleflow.train.stage2_step import Layout, Stage2Step, make_optimizer
from bundleflow.valuations.xor import atoms_and_values

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
    validation_time: float = 0.0


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
    menu.lottery_weights = m.lottery_weights
    if m.lottery_weights == "mixture":
        with torch.no_grad():
            menu.logits.zero_()  # even odds over the support points to start with
    if m.init_bundles in ("atoms", "atom_pairs") and data.kind == "xor":
        first = 1 if m.grand_bundle_element else 0
        bundles = top_atoms(data.train_user, m.size - first)
        with torch.no_grad():
            menu.means[first : first + bundles.shape[0]] = (
                CORNER_LOGIT * (2 * bundles[:, None, :] - 1)  # every support point on it
            )
        logger.info(
            "menu: elements {}..{} start as the training split's top atoms",
            first,
            first + bundles.shape[0] - 1,
        )
        rest = first + bundles.shape[0]
        if m.init_bundles == "atom_pairs" and rest < m.size and bundles.shape[0] > 1:
            with torch.no_grad():
                menu.means[rest:] = CORNER_LOGIT * (2 * atom_pairs(bundles, m, rest, gen) - 1)
            logger.info(
                "menu: elements {}..{} start as lotteries over two of those atoms",
                rest,
                m.size - 1,
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


def top_atoms(train_user: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` distinct atoms (bundles) of the XOR valuations ``[N, K, m+1]`` with the
    largest total value over the split (frequency × value), as 0/1 rows ``[≤ n, m]``."""
    atoms, values = atoms_and_values(train_user)
    flat, vals = atoms.reshape(-1, atoms.shape[-1]), values.reshape(-1)
    real = flat.sum(dim=-1) > 0
    unique, inverse = torch.unique(flat[real], dim=0, return_inverse=True)
    total = torch.zeros(unique.shape[0], dtype=torch.float64)
    total.index_add_(0, inverse, vals[real].double())
    order = torch.argsort(total, descending=True, stable=True)[:n]
    return unique[order].float()


def atom_pairs(
    atoms: torch.Tensor, menu: MenuConfig, first: int, gen: torch.Generator
) -> torch.Tensor:
    """Support-point corners ``[J − first, D, n_items]`` for elements ``first..J−1``: each a
    lottery over two distinct rows of ``atoms [A, n_items]`` (A ≥ 2), the first half of its
    D points on one and the rest on the other; the pairs drawn uniformly by ``gen``."""
    n, A = menu.size - first, atoms.shape[0]
    a = torch.randint(A, (n,), generator=gen)
    b = (a + torch.randint(1, A, (n,), generator=gen)) % A  # a different atom
    half = torch.arange(menu.support) < (menu.support + 1) // 2  # (D,)
    return torch.where(half[None, :, None], atoms[a][:, None, :], atoms[b][:, None, :])


def build_fallback(cfg: Config, data: RunData) -> PostedPrices | None:
    """``menu.fallback`` fitted on the training split, in normalised money (float32)."""
    if cfg.menu.fallback == "none":
        return None
    # the report scores the same fit: one fit per training split (cached by content)
    fitted = fitted_baselines(data.train_user)
    posted, record = fit_posted_prices(data.train_user, cfg.menu.fallback, fitted)
    logger.info(
        "menu: fallback {} pricing (training revenue {})",
        record["kind"],
        ", ".join(f"{k} {v:.4g}" for k, v in record["train_revenue"].items()),
    )
    return posted.scaled(1.0 / data.scale).to(dtype=torch.float32)


@torch.no_grad()
def price_at_fallback(
    menu: Menu,
    flow: VelocityField,
    fallback: PostedPrices,
    mix_temp: float,
    eps: torch.Tensor,
    rule: str = "expected",
) -> None:
    """``expected``: p_j = Σ_d α_jd·c(S_jd), every element weakly worse than the fallback;
    ``cheapest``: p_j = min over the bundles element j puts mass on (α_jd > 1e-6) of c(S_jd)
    (``menu.lottery_price``). ``eps``: the recorded evaluation noise, so the first
    validation sees these lotteries."""
    device = next(flow.parameters()).device
    lot = menu.to(device).lotteries(flow, mix_temp, eps=eps.to(device))
    cost = fallback.to(device).bundle_cost(lot.bundles)  # (J, D, m) -> (J, D)
    if rule == "cheapest":
        price = torch.where(lot.alpha > 1e-6, cost, torch.inf).amin(dim=-1)
    else:
        price = (lot.alpha * cost).sum(dim=-1)
    menu.prices.copy_(price.to(menu.prices.device))


def build_optimizer(menu: Menu, cfg: Config, plan: StepPlan) -> torch.optim.Adam:
    """Adam: lr for M and w, a separate (normalised-money) lr for the prices, built as the
    plan's step needs it (:func:`bundleflow.train.stage2_step.make_optimizer`)."""
    groups = [
        {"params": [menu.means, menu.logits], "lr": cfg.stage2.lr},
        {"params": [menu.prices], "lr": cfg.stage2.price_lr},
    ]
    return make_optimizer(menu, groups, plan.step_mode.value, kernels=plan.kernels.value)


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
        lottery_weights=menu.lottery_weights,
    )


@dataclass
class Stage2Parts:
    """Everything one Stage-2 step touches, built once per run (and by the profiler).

    ``parallel``: ``single`` (one process), ``shard`` (this rank owns menu elements
    ``[lo, hi)`` of ``n_elements`` and the whole batch) or ``replicate`` (the whole menu and
    ``1/world`` of the batch; gradients averaged). ``fallback``: posted prices offered as
    option J (normalised money, on the device), or None. ``step``: the one step
    (:class:`bundleflow.train.stage2_step.Stage2Step`) in the plan's mode, kernels and layout.
    """

    flow: VelocityField
    menu: Menu
    optimizer: torch.optim.Optimizer
    schedule: InvTempSchedule
    mix_factor: float
    seed: int
    n_elements: int
    plan: StepPlan
    comm: Comm = field(default_factory=Comm)
    parallel: str = "single"
    lo: int = 0
    fallback: PostedPrices | None = None
    step: Stage2Step | None = None
    generator: torch.Generator | None = None  # the step's draws (None: default CUDA one)
    reference: PostedPrices | None = None  # the fitted schedule (offered or not): selection

    @property
    def net(self) -> Menu:
        """The menu itself, also when Accelerate wrapped it."""
        return self.menu.module if hasattr(self.menu, "module") else self.menu

    @property
    def hi(self) -> int:
        return self.lo + self.net.menu_size

    def mix_temp(self) -> float:
        return self.schedule.value * self.mix_factor

    def advance(self, step: int) -> torch.Tensor:
        """Step ``step``: one optimizer step, then the λ update. Returns −R̃ on the device
        (over the global batch under ``shard``; this rank's part under ``replicate``)."""
        assert self.step is not None
        loss = self.step(self.schedule.value, self.mix_temp())
        self.schedule.update(step, self.mean_support_location)
        return loss

    def rng_state(self) -> dict:
        """The state of the generator the step draws from (for checkpoints)."""
        if self.generator is not None:
            return {"generator": self.generator.get_state()}
        return {"cuda": torch.cuda.get_rng_state(self.plan.device)}

    def set_rng_state(self, state: dict) -> None:
        if self.generator is not None and "generator" in state:
            self.generator.set_state(state["generator"])
        elif self.generator is None and "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], self.plan.device)

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
    plan: StepPlan,
    *,
    comm: Comm | None = None,
) -> Stage2Parts:
    """Frozen flow, initial menu (this rank's shard of it), optimizer, λ schedule, and the
    one step as ``plan`` says it runs (its draws seeded by ``stage2.seed``)."""
    comm = comm or Comm()
    device = plan.device
    full = build_menu(cfg, data)  # the same on every rank: one seed
    fallback = build_fallback(cfg, data)
    if fallback is not None and cfg.menu.posted_price_init:
        mix = cfg.stage2.inv_temp.initial * cfg.stage2.inv_temp.mixture_factor
        noise = eval_noise(full, cfg.eval.seed)
        price_at_fallback(full, flow, fallback, mix, noise, cfg.menu.lottery_price)
        logger.info("menu: elements start at the fallback's price of their lottery")
    parallel = cfg.stage2.parallel if comm.active else "single"
    lo, menu = 0, full
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
    parts = Stage2Parts(
        flow=freeze_flow(flow).to(device),
        menu=menu,
        optimizer=build_optimizer(menu, cfg, plan),
        schedule=build_schedule(cfg),
        mix_factor=cfg.stage2.inv_temp.mixture_factor,
        seed=cfg.stage2.seed,
        n_elements=cfg.menu.size,
        plan=plan,
        comm=comm,
        parallel=parallel,
        lo=lo,
        fallback=None if fallback is None or not cfg.menu.offer_fallback else fallback.to(device),
        reference=None if fallback is None else fallback.to(device),
    )
    if fallback is not None and not cfg.menu.offer_fallback:
        logger.info("menu: the fallback is not offered (menu.offer_fallback=false)")
    parts.step = build_step(parts, cfg, data)
    return parts


def build_step(parts: Stage2Parts, cfg: Config, data: RunData) -> Stage2Step:
    """The step in the plan's mode. Its draws come from one generator seeded once: a CPU
    generator on the CPU; on CUDA the default CUDA generator (the graph advances it as eager
    calls do), so eager and graph runs of one seed draw the same numbers."""
    plan, s2, device = parts.plan, cfg.stage2, parts.plan.device
    if device.type == "cuda":
        torch.cuda.manual_seed(s2.seed)
        parts.generator = None
    else:
        parts.generator = torch.Generator(device=device).manual_seed(s2.seed)
    sample = None
    if data.train is None:  # additive: fresh U[0,1]^m draws every step

        def sample(size: int, gen: torch.Generator | None) -> torch.Tensor:
            draws = torch.rand(size, data.n_items, generator=gen, device=device)
            return draws / data.scale

    layout = Layout(parts.parallel, parts.comm, parts.lo, parts.n_elements)
    scaler = torch.amp.GradScaler(device.type) if plan.q_dtype == torch.float16 else None
    return Stage2Step(
        parts.net,
        parts.flow,
        parts.optimizer,
        data.train,
        s2.batch_size,
        n_steps=cfg.flow.euler_steps,
        path=s2.path,
        mode=plan.step_mode.value,
        tf32=s2.tf32,
        exact_density_grad=s2.exact_density_grad,
        q_dtype=plan.q_dtype,
        generator=parts.generator,
        fallback=parts.fallback,
        kernels=plan.kernels.value,
        layout=layout,
        scaler=scaler,
        sample=sample,
        bundle_temp=cfg.menu.bundle_temp if cfg.menu.bundle_grad != "none" else None,
    )


@dataclass
class LoopState:
    """Where the loop is; saved in every resumable checkpoint."""

    step: int = 0
    best_val: float = float("-inf")
    best_step: int = 0
    since_best: int = 0
    wall_before: float = 0.0  # seconds of earlier sessions of this run
    best_mix_temp: float = 0.0
    validation_time: float = 0.0  # seconds spent validating (all sessions)


class Stage2Trainer:
    """Stage 2 as a recipe: :meth:`fit` steps, validates, checkpoints and freezes.

    Under several processes every rank builds one and calls :meth:`fit`; only the main
    process logs metrics, evaluates and writes files. The step itself is the one
    :class:`bundleflow.train.stage2_step.Stage2Step`, in the mode ``plan`` resolved.
    """

    def __init__(
        self,
        cfg: Config,
        flow: VelocityField,
        data: RunData,
        run: Run,
        plan: StepPlan,
        *,
        accelerator=None,
        show_progress: bool = True,
    ) -> None:
        self.cfg, self.data, self.run, self.plan = cfg, data, run, plan
        self.comm = Comm.from_accelerator(accelerator)
        self.parts = setup_stage2(cfg, flow, data, plan, comm=self.comm)
        if self.comm.active:
            logger.info(
                "stage 2: {} processes, parallel={} (this rank: elements {}..{})",
                self.comm.world,
                self.parts.parallel,
                self.parts.lo,
                self.parts.hi - 1,
            )
        J, D, m = cfg.menu.size, cfg.menu.support, data.n_items
        eps = torch.randn((J, D, m), generator=torch.Generator().manual_seed(cfg.eval.seed))
        self.eps_eval = eps.to(plan.device)
        self.state = LoopState(best_mix_temp=self.parts.mix_temp())
        self.ckpt_dir = run.dir / CHECKPOINTS
        self.data_record = {k: data.info.get(k) for k in ("path", "sha256", "money_scale", "kind")}
        self.saved_step = -1  # the step of the last resumable checkpoint on disk
        self._fallback_val: torch.Tensor | None = None  # the fallback alone's val payments
        self.best_menu: dict = {}
        self.initial_menu: dict = {}  # the step-0 menu (this session), for the polish
        self.show_progress = show_progress and run.main_process
        all_min = (lambda t: self.comm.all_reduce(t, "min")) if self.comm.active else None
        self.guard = FiniteGuard(plan.device, stage="stage 2", all_reduce_min=all_min)

    # -- one step, validation --------------------------------------------------------------

    def step(self) -> torch.Tensor:
        """One optimizer step and the λ update; −R̃ on the device (no host sync)."""
        self.state.step += 1
        return self.parts.advance(self.state.step)

    def validate(self) -> tuple[float, float, Menu]:
        """Hard validation revenue of the frozen menu (main process; broadcast), whole menu,
        and the z-score of its paired gain over the fallback alone (+inf without one)."""
        full = self.parts.full_menu()  # collective under shard
        val, z = float("nan"), float("nan")
        if self.run.main_process:
            mech = self.frozen(full, self.parts.mix_temp())
            payments = mech.outcome(self.data.val, batch_size=self.cfg.eval.batch_size)[1]
            val = float(payments.double().mean()) * self.data.scale
            z = self.gain_z(payments)
        val, z = self.comm.broadcast_floats([val, z], self.plan.device)
        return val, z, full

    def gain_z(self, payments: torch.Tensor) -> float:
        """mean(d)/SE(d) for d = payments − the fallback alone's payments on validation."""
        fallback = self.parts.reference
        if fallback is None:
            return float("inf")
        if self._fallback_val is None:
            val = self.data.val.to(payments.device)
            utility, pay = fallback.to(payments.device).outcome(val)
            self._fallback_val = hard_choice(utility[:, None], pay[:, None])[1].double()
        d = payments.double() - self._fallback_val
        se = float(d.std(unbiased=True)) / d.numel() ** 0.5 if d.numel() > 1 else 0.0
        mean = float(d.mean())
        if se == 0.0:
            return 0.0 if mean == 0.0 else math.copysign(math.inf, mean)
        return mean / se

    def evaluate(self, elapsed: float) -> bool:
        """Validate, keep the best, log; True when patience says stop."""
        started = time.monotonic()
        val, z, full = self.validate()
        st, s2 = self.state, self.cfg.stage2
        # the first validation is always a candidate; later ones must beat the fallback alone
        improved = val > st.best_val and (st.best_val == -math.inf or z >= s2.select_min_z)
        if improved:
            st.best_val, st.best_step, st.since_best = val, st.step, 0
            st.best_mix_temp = self.parts.mix_temp()
            self.save_best(full, val)
        else:
            st.since_best += 1
        schedule = self.parts.schedule
        self.run.metrics(
            stage=2,
            step=st.step,
            val_revenue=val,
            best_val_revenue=st.best_val,
            val_gain_z=z if math.isfinite(z) else None,  # None (null): no fallback to beat
            inv_temp=schedule.value,
            wall_time=elapsed,
            **gpu_metrics(self.plan.device),  # {} off CUDA
        )
        logger.info(
            "stage 2 step {}: validation revenue {:.4g}{} (λ {:.4g}, {:.0f}s)",
            st.step,
            val,
            " *best*" if improved else "",
            schedule.value,
            elapsed,
        )
        gpu = gpu_status_line(self.plan.device)  # None off CUDA: telemetry at this cadence
        if gpu is not None and self.run.main_process:
            logger.info("stage 2 step {}: {}", st.step, gpu)
        st.validation_time += time.monotonic() - started
        return s2.patience is not None and st.since_best >= s2.patience

    def frozen(self, menu: Menu, mix_temp: float, **kw) -> FrozenMechanism:
        return FrozenMechanism.freeze(
            menu,
            self.parts.flow,
            mix_temp,
            eps=self.eps_eval,
            n_steps=self.cfg.flow.euler_steps,
            fallback=self.parts.fallback,
            **kw,
        )

    # -- checkpoints -----------------------------------------------------------------------

    def last_good(self) -> str | None:
        done = self.saved_step
        return str(self.ckpt_dir / f"step-{done:09d}") if done >= 0 else None

    def save(self) -> None:
        """A resumable checkpoint of this step (never of a diverged state)."""
        st = self.state
        if self.saved_step == st.step:
            return  # already on disk
        self.guard.update(None, self.parts.net.parameters())
        self.guard.check(st.step, last_good=self.last_good())
        menu_state, opt_tensors, opt_rest = self.parts.full_state()  # collective under shard
        self.saved_step = st.step
        if not self.run.main_process:
            return
        extra = {
            "schedule": self.parts.schedule.state_dict(),
            "optimizer": opt_rest,
            "loop": asdict(st),
            "data": self.data_record,
            "processes": self.comm.world,
            "parallel": self.parts.parallel,
        }
        components = {"menu": menu_state, "optimizer": opt_tensors, "rng": self.parts.rng_state()}
        write_checkpoint(
            self.ckpt_dir / f"step-{st.step:09d}",
            components,
            step=st.step,
            config=to_dict(self.cfg),
            extra=extra,
        )
        prune(self.ckpt_dir, self.cfg.stage2.keep_checkpoints)

    def restore(self) -> None:
        """Continue from the latest resumable checkpoint."""
        found = latest(self.ckpt_dir)
        if found is None:
            raise BundleflowError(f"{self.ckpt_dir}: no checkpoint to resume from")
        components, manifest = read_checkpoint(found)
        extra = manifest["extra"]
        parts = self.parts
        parts.load_full_state(components["menu"], components["optimizer"], extra["optimizer"])
        parts.schedule.load_state_dict(extra["schedule"])
        known = {f.name for f in fields(LoopState)}
        self.state = LoopState(**{k: v for k, v in extra["loop"].items() if k in known})
        parts.set_rng_state(components.get("rng", {}))
        self.saved_step = self.state.step
        logger.info("resumed from {} (step {})", found, self.state.step)

    def save_best(self, full: Menu, val: float) -> None:
        """The menu with the best validation revenue so far, with the λ it was frozen at."""
        if not self.run.main_process:
            return
        extra = {
            "mix_temp": self.state.best_mix_temp,
            "inv_temp": self.parts.schedule.value,
            "val_revenue": val,
            "data": self.data_record,
        }
        replace_checkpoint(
            self.run.dir / BEST,
            {"menu": dict(full.state_dict())},
            step=self.state.step,
            config=to_dict(self.cfg),
            extra=extra,
        )
        menu = {k: v.detach().cpu().clone() for k, v in full.state_dict().items()}
        self.best_menu = {"menu": menu, "extra": extra}
        if self.state.step == 0:
            self.initial_menu = self.best_menu  # a second start for the polish

    # -- the loop --------------------------------------------------------------------------

    def fit(
        self, *, max_steps: int | None = None, max_time: float | None = None, resume: bool = False
    ) -> Stage2Result:
        s2, st = self.cfg.stage2, self.state
        total = max_steps or s2.steps
        max_time = max_time if max_time is not None else s2.max_time
        if resume:
            self.restore()
            st = self.state
        if self.parts.reference is not None and st.step == 0:
            self.evaluate(0.0)  # the untrained menu (beside the fallback) is a candidate too
        bar = ProgressBar(
            total, "stage 2", enabled=None if self.show_progress else False, unit="steps"
        )
        start, losses, reason = time.monotonic(), [], "max-steps"
        self.step_clock = st.wall_before - st.validation_time  # training time (step_time)
        with StopRequest() as stop:
            try:
                while st.step < total:
                    losses.append(self.step())
                    self.guard.update(losses[-1])  # on the device: no sync
                    elapsed = st.wall_before + time.monotonic() - start
                    if st.step % s2.log_every == 0:
                        self.log_progress(losses, elapsed)
                    at_eval = st.step % s2.eval_every == 0 or st.step == total
                    if at_eval and self.evaluate(elapsed):
                        reason = "patience"
                        break
                    if st.step % s2.checkpoint_every == 0:
                        st.wall_before, start = elapsed, time.monotonic()
                        self.save()
                    bar(st.step)
                    reason = self.should_stop(stop, elapsed, max_time) or reason
                    if reason in ("signal", "max-time"):
                        break
            except KeyboardInterrupt:  # a second signal: checkpoint what we have (one process)
                bar.close()
                st.wall_before += time.monotonic() - start
                if not self.comm.active:
                    self.save()
                logger.warning(
                    "interrupted at step {}; resume with: {}", st.step, self.resume_hint()
                )
                raise
        bar.close()
        st.wall_before += time.monotonic() - start
        return self.finish(reason)

    def log_progress(self, losses: list[torch.Tensor], elapsed: float) -> None:
        """Every ``log_every`` steps: the finite check (one sync) and the soft revenue."""
        st = self.state
        self.guard.update(losses[-1], self.parts.net.parameters())
        self.guard.check(st.step, last_good=self.last_good())  # agreed by the ranks
        mean_loss = torch.stack(losses).mean().reshape(1)
        n_steps = len(losses)
        losses.clear()
        if self.parts.parallel == "replicate":
            mean_loss = self.comm.all_reduce(mean_loss) / self.comm.world
        soft = -float(mean_loss) * self.data.scale
        inv = self.parts.schedule.value
        clock = elapsed - st.validation_time  # seconds per step, validation not counted
        step_time, self.step_clock = (clock - self.step_clock) / n_steps, clock
        self.run.metrics(
            stage=2, step=st.step, soft_revenue=soft, inv_temp=inv, wall_time=elapsed,
            step_time=step_time,
        )  # fmt: skip
        logger.debug("stage 2 step {} soft revenue {:.4g} λ {:.4g}", st.step, soft, inv)

    def should_stop(self, stop: StopRequest, elapsed: float, max_time: float | None) -> str:
        """``signal``, ``max-time`` or '' — the ranks' common decision (one collective every
        ``stage2.sync_every`` steps)."""
        out_of_time = max_time is not None and elapsed >= max_time
        if not self.comm.active:
            by_signal, by_time = stop.requested, out_of_time
        elif self.state.step % self.cfg.stage2.sync_every:
            return ""
        else:
            flags = torch.tensor(
                [float(stop.requested), float(out_of_time and self.comm.main)],
                device=self.plan.device,
            )
            by_signal, by_time = (x > 0 for x in self.comm.all_reduce(flags, "max").tolist())
        return "signal" if by_signal else "max-time" if by_time else ""

    def resume_hint(self) -> str:
        """A command to paste (issue 25: it was a fragment, and broke on a path with a space)."""
        return f"bundleflow train --resume {shlex.quote(str(self.run.dir))}"

    def finish(self, reason: str) -> Stage2Result:
        """After the loop: a checkpoint; unless stopped by a signal, the frozen best menu."""
        st = self.state
        mechanism = None
        if reason == "signal":
            self.save()
            logger.warning(
                "stopped by a signal at step {}; checkpoint written; resume with: {}",
                st.step,
                self.resume_hint(),
            )
        else:
            if st.best_val == float("-inf"):  # stopped before any evaluation: evaluate now
                self.evaluate(st.wall_before)
            self.save()
            mechanism = self.freeze()
            logger.info(
                "stage 2 done: {} steps ({}), best validation revenue {:.4g} at step {}",
                st.step,
                reason,
                st.best_val,
                st.best_step,
            )
        return Stage2Result(
            steps=st.step,
            best_step=st.best_step,
            best_val_revenue=st.best_val,
            stop_reason=reason,
            wall_time=st.wall_before,
            mechanism=mechanism,
            validation_time=st.validation_time,
        )

    def frozen_state(self, menu_state: dict, extra: dict, meta: dict) -> FrozenMechanism:
        """A saved menu state frozen with the λ it was saved at, in the user's units."""
        menu = menu_like(self.parts.net, menu_state).to(self.plan.device)
        return self.frozen(
            menu,
            extra["mix_temp"],
            inv_temp=extra.get("inv_temp"),
            money_scale=self.data.scale,
            meta=meta,
        )

    @torch.no_grad()
    def polish(self, mech: FrozenMechanism) -> float:
        """Exact hard-revenue price polish of the frozen best menu on the training split,
        the round kept by validation (``stage2.polish_rounds``; :mod:`bundleflow.maths.polish`)."""
        device, batch = mech.prices.device, self.cfg.eval.batch_size
        train = self.data.train_user.to(device)
        val = self.data.denormalise(self.data.val).to(device)
        values, fb_u, fb_pay = _outcome_columns(mech, train, batch)
        result = polish_prices(
            values,
            mech.prices,
            fb_u,
            fb_pay,
            rounds=self.cfg.stage2.polish_rounds,
            val=_outcome_columns(mech, val, batch),
            generator=torch.Generator().manual_seed(self.cfg.stage2.seed),
            plateau=True,
        )
        mech.prices = result.prices.to(device, mech.prices.dtype)
        mech.meta["polish"] = {
            "round_kept": result.round_kept,
            "train_revenue": result.train_revenue,
            "val_revenue": result.val_revenue,
            "changed": result.changed,
        }
        logger.info(
            "stage 2 polish: validation revenue {:.6g} -> {:.6g} (round {} of {} kept)",
            result.val_revenue[0],
            result.val_revenue[result.round_kept],
            result.round_kept,
            len(result.val_revenue) - 1,
        )
        return result.val_revenue[result.round_kept]

    def freeze(self) -> FrozenMechanism | None:
        """The best validation menu frozen with the recorded noise, saved (main process)."""
        mech = None
        if self.run.main_process:
            if self.best_menu:
                menu_state, extra = self.best_menu["menu"], self.best_menu["extra"]
            else:  # the best menu is from before a resume
                components, manifest = read_checkpoint(self.run.dir / BEST)
                menu_state, extra = components["menu"], manifest["extra"]
            st = self.state
            meta = {
                "best_step": st.best_step,
                "val_revenue": st.best_val,
                "eval_seed": self.cfg.eval.seed,
            }
            mech = self.frozen_state(menu_state, extra, meta)
            if self.cfg.stage2.polish_rounds > 0:
                val = self.polish(mech)
                if st.best_step != 0 and self.initial_menu:
                    # Polish the untrained menu too and keep the better on validation: on
                    # additive U[4,16]×U[4,7] soft training drifts to a deterministic local
                    # optimum the polish cannot leave, while polishing the step-0 menu
                    # (posted prices, even lotteries) reaches 0.995 of the optimum.
                    first = self.initial_menu
                    start = self.frozen_state(
                        first["menu"], first["extra"], {**meta, "best_step": 0}
                    )
                    if self.polish(start) > val:
                        logger.info("stage 2 polish: the polished step-0 menu is kept")
                        mech = start
            mech = mech.to("cpu")
            mech.save(self.run.dir / MECHANISM_FILE)
        self.comm.barrier()
        return mech


def _outcome_columns(mech: FrozenMechanism, valuations: torch.Tensor, batch: int):
    """(element values ``[N, J]``, the fallback's utility ``[N]`` (−inf: none) and payment
    ``[N]``) of a frozen mechanism, user units, float64."""
    values = (
        torch.cat([mech.utilities(chunk).double() for chunk in valuations.split(batch)])
        + mech.prices.double()
    )
    n = values.shape[0]
    if mech.fallback is None:
        return values, values.new_full((n,), -math.inf), values.new_zeros(n)
    u, pay = mech.fallback.outcome(valuations.to(mech.prices.device))
    return values, u.double(), pay.double()


def train_stage2(
    cfg: Config,
    flow: VelocityField,
    data: RunData,
    run: Run,
    plan: StepPlan,
    *,
    accelerator=None,
    max_steps: int | None = None,
    max_time: float | None = None,
    resume: bool = False,
    show_progress: bool = True,
) -> Stage2Result:
    """Stage 2 of a run: build the trainer and fit."""
    trainer = Stage2Trainer(
        cfg, flow, data, run, plan, accelerator=accelerator, show_progress=show_progress
    )
    return trainer.fit(max_steps=max_steps, max_time=max_time, resume=resume)


def read_mechanism(run_dir: Path) -> FrozenMechanism:
    """A finished run's frozen mechanism; a user error naming what the path lacks otherwise."""

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
