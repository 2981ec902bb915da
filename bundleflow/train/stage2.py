"""Stage 2: learn the menu on soft revenue, select on validation hard revenue, freeze it."""

from __future__ import annotations

import math
import shlex
import time
from dataclasses import asdict, dataclass, fields

import torch
from loguru import logger

from bundleflow.errors import BundleflowError
from bundleflow.evaluation.mechanism import FrozenMechanism
from bundleflow.maths.flow import VelocityField
from bundleflow.maths.menu import Menu, freeze_flow
from bundleflow.maths.revenue import hard_choice
from bundleflow.maths.schedule import InvTempSchedule
from bundleflow.system.distributed import Comm
from bundleflow.system.progress import ProgressBar
from bundleflow.system.telemetry import gpu_metrics, gpu_status_line
from bundleflow.train.checkpoint import (
    latest,
    prune,
    read_checkpoint,
    replace_checkpoint,
    write_checkpoint,
)
from bundleflow.train.config import Config, to_dict
from bundleflow.train.data import RunData
from bundleflow.train.finish import MECHANISM_FILE, polish_mechanism
from bundleflow.train.health import FiniteGuard
from bundleflow.train.menu_init import (
    build_fallback,
    build_menu,
    eval_noise,
    menu_like,
    price_at_fallback,
)
from bundleflow.train.plan import StepPlan
from bundleflow.train.run import Run
from bundleflow.train.shards import MenuShard
from bundleflow.train.signals import StopRequest
from bundleflow.train.stage2_step import Stage2Step, StepOptions, make_optimizer

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

    Built in named setup steps (the posted-price option, the menu and this rank's part of
    it, the optimizer and λ schedule, the one step), then :meth:`step` is one optimizer step
    and the λ update: what the profiler, the leak check and the scaling bench run too,
    without a run directory (``run=None``: no validation, no checkpoints). Under several
    processes every rank builds one and calls :meth:`fit`; only the main process logs
    metrics, evaluates and writes files.
    """

    def __init__(
        self,
        cfg: Config,
        flow: VelocityField,
        data: RunData,
        plan: StepPlan,
        *,
        run: Run | None = None,
        accelerator=None,
        comm: Comm | None = None,
        show_progress: bool = True,
    ) -> None:
        self.cfg, self.data, self.run, self.plan = cfg, data, run, plan
        self.comm = comm or Comm.from_accelerator(accelerator)
        shape = (cfg.menu.size, cfg.menu.support, data.n_items)
        self.eps_eval = eval_noise(shape, cfg.eval.seed).to(plan.device)  # freezes every menu
        self._setup_posted_prices()
        self._setup_menu(flow)
        self._setup_optimizer()
        self._setup_step()
        self.state = LoopState(best_mix_temp=self.mix_temp())
        self.ckpt_dir = None if run is None else run.dir / CHECKPOINTS
        self.data_record = {k: data.info.get(k) for k in ("path", "sha256", "money_scale", "kind")}
        self.saved_step = -1  # the step of the last resumable checkpoint on disk
        self._reference_val: torch.Tensor | None = None  # the posted prices alone's payments
        self.best_menu: dict = {}
        self.initial_menu: dict = {}  # the step-0 menu (this session), for the polish
        self.show_progress = show_progress and (run is None or run.main_process)
        all_min = (lambda t: self.comm.all_reduce(t, "min")) if self.comm.active else None
        self.guard = FiniteGuard(plan.device, stage="stage 2", all_reduce_min=all_min)

    # -- setup -----------------------------------------------------------------------------

    def _setup_posted_prices(self) -> None:
        """``menu.fallback`` fitted on the training split: ``reference`` (what selection must
        beat) and ``posted`` (offered beside the menu as option J, or None)."""
        posted = build_fallback(self.cfg, self.data)
        device = self.plan.device
        self.reference = None if posted is None else posted.to(device)
        self.posted = self.reference if self.cfg.menu.offer_fallback else None
        if posted is not None and not self.cfg.menu.offer_fallback:
            logger.info("menu: the fallback is not offered (menu.offer_fallback=false)")

    def _setup_menu(self, flow: VelocityField) -> None:
        """The frozen flow and the initial menu (priced at the posted prices with
        ``menu.posted_price_init``); ``shard``: this rank's part of it."""
        cfg = self.cfg
        full = build_menu(cfg, self.data)  # the same on every rank: one seed
        if self.reference is not None and cfg.menu.posted_price_init:
            mix = cfg.stage2.inv_temp.initial * cfg.stage2.inv_temp.mixture_factor
            price_at_fallback(
                full, flow, self.reference, mix, self.eps_eval, cfg.menu.lottery_price
            )
            logger.info("menu: elements start at the fallback's price of their lottery")
        self.shard = MenuShard.split(full, cfg, self.comm)
        self.menu = self.shard.menu = self.shard.menu.to(self.plan.device)
        self.flow = freeze_flow(flow).to(self.plan.device)
        if self.comm.active:
            logger.info(
                "stage 2: {} processes, parallel={} (this rank: elements {}..{})",
                self.comm.world, self.shard.parallel, self.shard.lo, self.shard.hi - 1,
            )  # fmt: skip

    def _setup_optimizer(self) -> None:
        """Adam (lr for M and w, a normalised-money lr for the prices) as the plan's step
        needs it, and the λ schedule."""
        cfg, menu = self.cfg, self.menu
        groups = [
            {"params": [menu.means, menu.logits], "lr": cfg.stage2.lr},
            {"params": [menu.prices], "lr": cfg.stage2.price_lr},
        ]
        plan = self.plan
        self.optimizer = make_optimizer(
            menu, groups, plan.step_mode.value, kernels=plan.kernels.value
        )
        s = cfg.stage2.inv_temp
        self.schedule = InvTempSchedule(
            value=s.initial, cap=s.cap, growth=s.growth, reset_value=s.reset_value,
            slow_growth=s.slow_growth, interval=s.interval, reset_interval=s.reset_interval,
            location_threshold=s.location_threshold,
        )  # fmt: skip

    def _setup_step(self) -> None:
        """The one step in the plan's mode. Its draws come from one generator seeded once: a
        CPU generator on the CPU; on CUDA the default CUDA generator (the graph advances it
        as eager calls do), so eager and graph runs of one seed draw the same numbers."""
        device, seed, data = self.plan.device, self.cfg.stage2.seed, self.data
        self.generator = None
        if device.type == "cuda":
            torch.cuda.manual_seed(seed)
        else:
            self.generator = torch.Generator(device=device).manual_seed(seed)
        batches = data.train
        if batches is None:  # additive: fresh U[0,1]^m draws every step

            def batches(size: int, gen: torch.Generator | None) -> torch.Tensor:
                draws = torch.rand(size, data.n_items, generator=gen, device=device)
                return draws / data.scale

        self.step_fn = Stage2Step(
            self.menu, self.flow, self.optimizer, batches,
            StepOptions.from_run(self.cfg, self.plan),
            generator=self.generator, posted=self.posted, layout=self.shard.layout(),
        )  # fmt: skip

    # -- one step, validation --------------------------------------------------------------

    def mix_temp(self) -> float:
        return self.schedule.value * self.cfg.stage2.inv_temp.mixture_factor

    def step(self) -> torch.Tensor:
        """One optimizer step, then the λ update. Returns −R̃ on the device, no host sync
        (over the global batch under ``shard``; this rank's part under ``replicate``)."""
        self.state.step += 1
        loss = self.step_fn(self.schedule.value, self.mix_temp())
        self.schedule.update(self.state.step, self._mean_support_location)
        return loss

    def _mean_support_location(self) -> float:
        return self.shard.mean_support_location(self.mix_temp())

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

    def validate(self) -> tuple[float, float, Menu]:
        """Hard validation revenue of the frozen menu (main process; broadcast), whole menu,
        and the z-score of its paired gain over the fallback alone (+inf without one)."""
        full = self.shard.full_menu()  # collective under shard
        val, z = float("nan"), float("nan")
        if self.run.main_process:
            mech = self.frozen(full, self.mix_temp())
            payments = mech.outcome(self.data.val, batch_size=self.cfg.eval.batch_size)[1]
            val = float(payments.double().mean()) * self.data.scale
            z = self.gain_z(payments)
        val, z = self.comm.broadcast_floats([val, z], self.plan.device)
        return val, z, full

    def gain_z(self, payments: torch.Tensor) -> float:
        """mean(d)/SE(d) for d = payments − the fallback alone's payments on validation."""
        fallback = self.reference
        if fallback is None:
            return float("inf")
        if self._reference_val is None:
            val = self.data.val.to(payments.device)
            utility, pay = fallback.to(payments.device).outcome(val)
            self._reference_val = hard_choice(utility[:, None], pay[:, None])[1].double()
        d = payments.double() - self._reference_val
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
            st.best_mix_temp = self.mix_temp()
            self.save_best(full, val)
        else:
            st.since_best += 1
        schedule = self.schedule
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
            self.flow,
            mix_temp,
            eps=self.eps_eval,
            n_steps=self.cfg.flow.euler_steps,
            fallback=self.posted,
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
        self.guard.update(None, self.menu.parameters())
        self.guard.check(st.step, last_good=self.last_good())
        menu_state, opt_tensors, opt_rest = self.shard.full_state(
            self.optimizer
        )  # collective under shard
        self.saved_step = st.step
        if not self.run.main_process:
            return
        extra = {
            "schedule": self.schedule.state_dict(),
            "optimizer": opt_rest,
            "loop": asdict(st),
            "data": self.data_record,
            "processes": self.comm.world,
            "parallel": self.shard.parallel,
        }
        components = {"menu": menu_state, "optimizer": opt_tensors, "rng": self.rng_state()}
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
        self.shard.load_full_state(
            self.optimizer, components["menu"], components["optimizer"], extra["optimizer"]
        )
        self.schedule.load_state_dict(extra["schedule"])
        known = {f.name for f in fields(LoopState)}
        self.state = LoopState(**{k: v for k, v in extra["loop"].items() if k in known})
        self.set_rng_state(components.get("rng", {}))
        self.saved_step = self.state.step
        logger.info("resumed from {} (step {})", found, self.state.step)

    def save_best(self, full: Menu, val: float) -> None:
        """The menu with the best validation revenue so far, with the λ it was frozen at."""
        if not self.run.main_process:
            return
        extra = {
            "mix_temp": self.state.best_mix_temp,
            "inv_temp": self.schedule.value,
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
        if self.reference is not None and st.step == 0:
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
        self.guard.update(losses[-1], self.menu.parameters())
        self.guard.check(st.step, last_good=self.last_good())  # agreed by the ranks
        mean_loss = torch.stack(losses).mean().reshape(1)
        n_steps = len(losses)
        losses.clear()
        if self.shard.parallel == "replicate":
            mean_loss = self.comm.all_reduce(mean_loss) / self.comm.world
        soft = -float(mean_loss) * self.data.scale
        inv = self.schedule.value
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
        menu = menu_like(self.menu, menu_state).to(self.plan.device)
        return self.frozen(
            menu,
            extra["mix_temp"],
            inv_temp=extra.get("inv_temp"),
            money_scale=self.data.scale,
            meta=meta,
        )

    def polish(self, mech: FrozenMechanism) -> float:
        """The exact price polish of a frozen menu (:func:`polish_mechanism`)."""
        return polish_mechanism(mech, self.data, self.cfg)

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
