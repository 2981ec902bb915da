"""Stage 2: learn the menu on soft revenue, select on validation hard revenue, freeze it."""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
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
from bundleflow.doctor import gpu_status_line
from bundleflow.errors import BundleflowError
from bundleflow.fast_step import Stage2Step, stage2_loss
from bundleflow.flow import VelocityField
from bundleflow.mechanism import FrozenMechanism
from bundleflow.menu import Menu, freeze_flow
from bundleflow.progress import ProgressBar
from bundleflow.schedule import InvTempSchedule
from bundleflow.train.data import RunData
from bundleflow.train.run import Run, optimizer_step

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
    mechanism: FrozenMechanism


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


def graph_unavailable(device: torch.device, has_pool: bool, accelerator) -> str | None:
    """Why the CUDA-graph step cannot run here, or None when it can."""
    if device.type != "cuda":
        return f"the device is {device.type}, not CUDA"
    if not has_pool:
        return "additive runs draw fresh valuations (no device-resident pool)"
    if accelerator is not None and accelerator.num_processes > 1:
        return "several processes (use eager under accelerate launch)"
    if accelerator is not None and accelerator.mixed_precision not in (None, "no"):
        return f"mixed precision {accelerator.mixed_precision} (the graph step is fp32)"
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


def _gen_state(gen: torch.Generator) -> torch.Tensor:
    return gen.get_state().clone()


@dataclass
class Stage2Parts:
    """Everything one Stage-2 step touches, built once per run (and by the profiler)."""

    flow: VelocityField
    menu: Menu
    optimizer: torch.optim.Optimizer
    schedule: InvTempSchedule
    batch_gen: torch.Generator
    noise_gen: torch.Generator
    mix_factor: float

    @property
    def net(self) -> Menu:
        """The menu itself, also when Accelerate wrapped it."""
        return self.menu.module if hasattr(self.menu, "module") else self.menu

    def mix_temp(self) -> float:
        return self.schedule.value * self.mix_factor


def setup_stage2(
    cfg: Config, flow: VelocityField, data: RunData, device: torch.device, *, capturable=False
) -> Stage2Parts:
    """Frozen flow, initial menu, its optimizer, λ schedule and the two seeded generators."""
    menu = build_menu(cfg, data).to(device)
    return Stage2Parts(
        flow=freeze_flow(flow).to(device),
        menu=menu,
        optimizer=build_optimizer(menu, cfg, device, capturable=capturable),
        schedule=build_schedule(cfg),
        batch_gen=torch.Generator().manual_seed(cfg.stage2.seed + 1),
        noise_gen=torch.Generator(device=device).manual_seed(cfg.stage2.seed + 2),
        mix_factor=cfg.stage2.inv_temp.mixture_factor,
    )


def train_step(parts: Stage2Parts, cfg: Config, data: RunData, step: int, accelerator=None):
    """One Stage-2 step (fresh batch and ε, loss, backward, optimizer, λ update): the loss."""
    s2, net = cfg.stage2, parts.net
    device = net.means.device
    batch = data.batch(s2.batch_size, parts.batch_gen, device)
    ctx = accelerator.autocast() if accelerator is not None else contextlib.nullcontext()
    with ctx:
        loss, _ = stage2_loss(
            net,
            parts.flow,
            batch,
            parts.schedule.value,
            parts.mix_temp(),
            net.draw_noise(parts.noise_gen),
            n_steps=cfg.flow.euler_steps,
            path=s2.path,
            exact_density_grad=s2.exact_density_grad,
        )
    optimizer_step(loss, parts.optimizer, accelerator)
    parts.schedule.update(step, lambda: net.mean_support_location(parts.mix_temp()))
    return loss.detach()


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
) -> Stage2Result:
    """The Stage-2 loop; a plain function. See the module docstring."""
    s2 = cfg.stage2
    total_steps = max_steps or s2.steps
    max_time = max_time if max_time is not None else s2.max_time
    reason = graph_unavailable(device, data.train is not None, accelerator)
    if s2.step_mode == "graph" and reason is not None:
        raise BundleflowError(f"config key 'stage2.step_mode': graph is unavailable: {reason}")
    use_graph = s2.step_mode != "eager" and reason is None
    if use_graph:
        torch.cuda.manual_seed(s2.seed + 2)  # the graph draws batches and ε from this generator
    elif s2.step_mode == "auto" and device.type == "cuda":
        logger.info("stage 2: eager steps ({})", reason)
    parts = setup_stage2(cfg, flow, data, device, capturable=use_graph)
    flow, menu, optimizer, schedule = parts.flow, parts.menu, parts.optimizer, parts.schedule
    batch_gen, noise_gen, mix_factor = parts.batch_gen, parts.noise_gen, parts.mix_factor
    eps_eval = eval_noise(menu, cfg.eval.seed).to(device)
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
        rng = _restore(ckpt_dir, menu, optimizer, schedule, batch_gen, noise_gen, state, device)
        if use_graph and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], device)
    if accelerator is not None:
        parts.menu, parts.optimizer = accelerator.prepare(menu, optimizer)
        menu, optimizer = parts.menu, parts.optimizer
    net: Menu = parts.net
    stepper = None
    if use_graph:
        raw_optimizer = getattr(optimizer, "optimizer", optimizer)  # unwrap Accelerate's
        stepper = Stage2Step(
            net,
            flow,
            raw_optimizer,
            data.train,
            s2.batch_size,
            n_steps=cfg.flow.euler_steps,
            path=s2.path,
            mode="graph",
            exact_density_grad=s2.exact_density_grad,
        )
        logger.info("stage 2: CUDA-graph step (captured after {} eager steps)", stepper.warmup)

    def checkpoint_components() -> dict:
        opt_tensors, opt_rest = optimizer_tensors(optimizer)
        return {
            "menu": dict(net.state_dict()),
            "optimizer": opt_tensors,
            "rng": {
                "batch": _gen_state(batch_gen),
                "noise": _gen_state(noise_gen).cpu(),
                **({"cuda": torch.cuda.get_rng_state(device)} if use_graph else {}),
            },
        }, opt_rest

    def save_resumable() -> None:
        if (ckpt_dir / f"step-{state['step']:09d}").exists():
            return  # this step is already on disk
        components, opt_rest = checkpoint_components()
        extra = {
            "schedule": schedule.state_dict(),
            "optimizer": opt_rest,
            "loop": state,
            "data": data_record,
        }
        write_checkpoint(
            ckpt_dir / f"step-{state['step']:09d}",
            components,
            step=state["step"],
            config=to_dict(cfg),
            extra=extra,
        )
        prune(ckpt_dir, s2.keep_checkpoints)

    def save_best(val: float) -> None:
        """The menu with the best validation revenue so far, with the λ it was frozen at."""
        extra = {
            "mix_temp": state["best_mix_temp"],
            "inv_temp": schedule.value,
            "val_revenue": val,
            "data": data_record,
        }
        replace_checkpoint(
            run.dir / BEST,
            {"menu": dict(net.state_dict())},
            step=state["step"],
            config=to_dict(cfg),
            extra=extra,
        )

    def validate() -> float:
        mix_temp = schedule.value * mix_factor
        mech = FrozenMechanism.freeze(
            net, flow, mix_temp, eps=eps_eval, n_steps=cfg.flow.euler_steps
        )
        return mech.revenue(data.val, batch_size=cfg.eval.batch_size) * data.scale

    start = time.monotonic()
    bar = ProgressBar(total_steps, "stage 2", enabled=None if show_progress else False)
    stop_reason = "max-steps"
    recent_loss = []
    try:
        while state["step"] < total_steps:
            state["step"] += 1
            step = state["step"]
            if stepper is None:
                recent_loss.append(train_step(parts, cfg, data, step, accelerator))
            else:
                recent_loss.append(stepper(schedule.value, parts.mix_temp()))
                schedule.update(step, lambda: net.mean_support_location(parts.mix_temp()))
            elapsed = state["wall_before"] + time.monotonic() - start
            if step % s2.log_every == 0:
                soft = -float(torch.stack(recent_loss).mean()) * data.scale
                recent_loss.clear()
                if not torch.isfinite(torch.tensor(soft)):
                    raise BundleflowError(
                        f"stage 2: soft revenue became non-finite at step {step}; lower "
                        "stage2.lr / stage2.price_lr or the λ cap"
                    )
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
                gpu = gpu_status_line(device)  # None off CUDA
                if gpu is not None and run.main_process:
                    logger.info("stage 2 step {}: {}", step, gpu)
            if step % s2.eval_every == 0 or step == total_steps:
                val = validate()
                improved = val > state["best_val"]
                if improved:
                    state.update(
                        best_val=val,
                        best_step=step,
                        since_best=0,
                        best_mix_temp=schedule.value * mix_factor,
                    )
                    save_best(val)
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
                if s2.patience is not None and state["since_best"] >= s2.patience:
                    stop_reason = "patience"
                    break
            if step % s2.checkpoint_every == 0:
                state["wall_before"] = elapsed
                start = time.monotonic()
                save_resumable()
            bar(step)
            if max_time is not None and elapsed >= max_time:
                stop_reason = "max-time"
                break
    except KeyboardInterrupt:
        bar.close()
        state["wall_before"] += time.monotonic() - start
        save_resumable()
        logger.warning("interrupted at step {}; resume with --resume {}", state["step"], run.dir)
        raise
    bar.close()
    state["wall_before"] += time.monotonic() - start
    start = time.monotonic()
    if state["best_step"] == 0:  # stopped before any evaluation: evaluate now
        val = validate()
        state.update(
            best_val=val, best_step=state["step"], best_mix_temp=schedule.value * mix_factor
        )
        save_best(val)
    save_resumable()
    best_components, best_manifest = read_checkpoint(run.dir / BEST, device=device)
    net.load_state_dict(best_components["menu"])
    mech = FrozenMechanism.freeze(
        net,
        flow,
        best_manifest["extra"]["mix_temp"],
        inv_temp=best_manifest["extra"].get("inv_temp"),
        eps=eps_eval,
        n_steps=cfg.flow.euler_steps,
        money_scale=data.scale,
        meta={
            "best_step": state["best_step"],
            "val_revenue": state["best_val"],
            "eval_seed": cfg.eval.seed,
        },
    ).to("cpu")
    if run.main_process:
        mech.save(run.dir / MECHANISM_FILE)
    logger.info(
        "stage 2 done: {} steps ({}), best validation revenue {:.4g} at step {}",
        state["step"],
        stop_reason,
        state["best_val"],
        state["best_step"],
    )
    return Stage2Result(
        steps=state["step"],
        best_step=state["best_step"],
        best_val_revenue=state["best_val"],
        stop_reason=stop_reason,
        wall_time=state["wall_before"],
        mechanism=mech,
    )


def _restore(
    ckpt_dir: Path, menu, optimizer, schedule, batch_gen, noise_gen, state, device
) -> dict:
    found = latest(ckpt_dir)
    if found is None:
        raise BundleflowError(f"{ckpt_dir}: no checkpoint to resume from")
    components, manifest = read_checkpoint(found)
    menu.load_state_dict({k: v.to(device) for k, v in components["menu"].items()})
    opt = {
        k: v.to(device) if k.endswith(("exp_avg", "exp_avg_sq")) else v
        for k, v in components["optimizer"].items()
    }
    load_optimizer_tensors(optimizer, opt, manifest["extra"]["optimizer"])
    schedule.load_state_dict(manifest["extra"]["schedule"])
    batch_gen.set_state(components["rng"]["batch"])
    noise_gen.set_state(
        components["rng"]["noise"].to(noise_gen.device)
        if noise_gen.device.type != "cuda"
        else components["rng"]["noise"]
    )
    state.update(manifest["extra"]["loop"])
    logger.info("resumed from {} (step {})", found, state["step"])
    return components["rng"]


def read_mechanism(run_dir: Path) -> FrozenMechanism:
    path = run_dir / MECHANISM_FILE
    if not path.is_file():
        raise BundleflowError(
            f"{run_dir}: no {MECHANISM_FILE}; the run has not finished Stage 2 "
            f"(resume it with `bundleflow train --resume {run_dir}`)"
        )
    return FrozenMechanism.load(path)


def summary_json(result: Stage2Result) -> str:
    return json.dumps({k: getattr(result, k) for k in ("steps", "best_step", "stop_reason")})
