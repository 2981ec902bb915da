"""Stage 1: train the rectified flow, or take it from the content-keyed cache."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
from loguru import logger

from bundleflow.checkpoint import (
    clean_stale,
    latest,
    load_optimizer_tensors,
    optimizer_tensors,
    prune,
    read_checkpoint,
    write_checkpoint,
)
from bundleflow.config import FlowConfig, Stage1Config
from bundleflow.errors import BundleflowError
from bundleflow.flow import (
    MixtureNoise,
    VelocityField,
    flow_from_state,
    flow_pairs,
    flow_state,
    load_reference_flow,
    rectified_flow_loss,
)
from bundleflow.progress import ProgressBar
from bundleflow.telemetry import gpu_status_line
from bundleflow.train.run import optimizer_step
from bundleflow.train.signals import StopRequest
from bundleflow.valuations.io import default_cache_dir

FLOW_FILE = "flow.json"  # in a run directory: which flow the run used


def flow_key(n_items: int, flow: FlowConfig, stage1: Stage1Config) -> str:
    """Content key of a Stage-1 flow: everything that determines its weights."""
    blob = {"n_items": n_items, "flow": asdict(flow), "stage1": asdict(stage1), "format": 1}
    blob["stage1"].pop("log_every")
    blob["stage1"].pop("checkpoint_every")
    if blob["stage1"]["lr_schedule"] == "constant":  # keys of flows cached before the option
        blob["stage1"].pop("lr_schedule")
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:20]


def flow_cache_dir(key: str) -> Path:
    return default_cache_dir() / "flows" / key


def train_stage1(
    n_items: int,
    flow_cfg: FlowConfig,
    cfg: Stage1Config,
    device: torch.device,
    *,
    accelerator=None,
    metrics=None,
    max_time: float | None = None,
    show_progress: bool = True,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
) -> tuple[VelocityField, MixtureNoise, dict]:
    """Plain Stage-1 loop: Adam on fresh pairs each step. Returns the field, mixture, summary.

    With ``checkpoint_dir`` (a run's ``stage1/``) the loop writes a resumable checkpoint every
    ``cfg.checkpoint_every`` steps and at the end, and on SIGTERM/SIGINT finishes its step,
    writes one and raises :class:`Stage1Stopped`; with ``resume`` it continues from the
    latest one there. A resumed run ends with the same flow, bit for bit on the CPU, as one
    never stopped: the checkpoint holds the weights, Adam's state, the losses so far, the lr
    schedule and the state of the generator that draws every pair.
    """
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    field = VelocityField(n_items, flow_cfg.hidden, flow_cfg.hidden2)
    noise = MixtureNoise(n_items, flow_cfg.n_components, flow_cfg.log_std, generator=gen)
    optimizer = torch.optim.Adam(field.parameters(), lr=cfg.lr)
    done, losses_so_far, schedule_state = 0, None, None
    if resume and checkpoint_dir is not None:
        restored = _restore_stage1(checkpoint_dir, n_items, flow_cfg, cfg, field, noise, optimizer)
        if restored is not None:
            done, gen_state, losses_so_far, schedule_state = restored
            gen.set_state(gen_state)
    field.to(device)
    _optimizer_state_to(optimizer, device)
    rank, world = 0, 1
    if accelerator is not None:
        # Mixed precision: the prepared model's forward runs under autocast and
        # accelerator.backward scales fp16 losses. Several processes: DDP averages the
        # gradients of each rank's slice of the (same, seeded) global batch.
        field, optimizer = accelerator.prepare(field, optimizer)
        rank, world = accelerator.process_index, accelerator.num_processes
    if world > 1 and max_time is not None:
        logger.warning("stage 1: --max-time is ignored under several processes")
        max_time = None
    net = field.module if hasattr(field, "module") else field
    part = cfg.batch_size // world
    schedule = None
    if cfg.lr_schedule == "cosine":
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.steps)
        if schedule_state is not None:  # where the stopped run was
            schedule.load_state_dict(schedule_state)
    start = time.monotonic()
    show = show_progress and rank == 0  # one bar, not one per process
    bar = ProgressBar(cfg.steps, "stage 1", enabled=None if show else False, unit="steps")
    # Losses go into one preallocated tensor (no host sync per step). Keeping the 0-d
    # `loss.detach()` tensors instead keeps each step's reduction buffer alive on the CPU:
    # ~160 KB per step at batch 2,048, 5 GB over the paper's 30,000 steps (measured).
    history = torch.empty(cfg.steps, device=device)
    if losses_so_far is not None:
        history[:done] = losses_so_far.to(device)

    def save(at: int) -> None:
        if checkpoint_dir is not None and rank == 0:
            _save_stage1(checkpoint_dir, at, (n_items, flow_cfg, cfg), net, noise, optimizer,
                         gen, history[:at], schedule)  # fmt: skip

    step = done
    stop = StopRequest() if checkpoint_dir is not None and world == 1 else None
    with stop if stop is not None else contextlib.nullcontext():
        for step in range(done + 1, cfg.steps + 1):
            z0, z1 = flow_pairs(
                noise, cfg.batch_size, target_std=flow_cfg.target_std, generator=gen
            )
            t = torch.rand(cfg.batch_size, 1, generator=gen)
            z0, z1, t = (x[rank * part : (rank + 1) * part] for x in (z0, z1, t))
            z0, z1, t = (x.to(device, non_blocking=True) for x in (z0, z1, t))
            loss = rectified_flow_loss(field, z0, z1, t)
            optimizer_step(loss, optimizer, accelerator)
            if schedule is not None:
                schedule.step()
            history[step - 1] = loss.detach()
            if step % cfg.log_every == 0 or step == cfg.steps:
                value = float(history[max(0, step - cfg.log_every) : step].mean())
                elapsed = time.monotonic() - start
                if metrics is not None:
                    metrics(stage=1, step=step, loss=value, wall_time=elapsed)
                logger.debug("stage 1 step {} loss {:.5f}", step, value)
            if bar(step) and rank == 0:  # the progress-line cadence: each 10% of the steps
                gpu = gpu_status_line(device)  # None off CUDA
                if gpu is not None:
                    logger.info("stage 1 step {}: {}", step, gpu)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                save(step)
            if stop is not None and stop.requested:
                bar.close()
                save(step)
                raise Stage1Stopped(step)
            if max_time is not None and time.monotonic() - start > max_time:
                logger.info("stage 1: --max-time reached after {} steps", step)
                break
    bar.close()
    net.to("cpu").eval().requires_grad_(False)
    noise.to("cpu")
    # Disjoint windows (at most 20 first / 100 last steps), so a short run still compares
    # its start with its end instead of averaging the same steps twice.
    half = max(1, step // 2)
    first = float(history[: min(20, half)].mean())
    last = float(history[step - min(100, half) : step].mean())
    summary = {
        "steps": step,
        "loss_first": first,
        "loss_last": last,
        "wall_time": time.monotonic() - start,
    }
    logger.info("stage 1: {} steps, loss {:.4f} -> {:.4f}", step, first, last)
    return net, noise, summary


class Stage1Stopped(Exception):
    """Stage 1 stopped by a signal after writing a checkpoint of ``step``."""

    def __init__(self, step: int) -> None:
        super().__init__(f"stage 1 stopped by a signal at step {step}")
        self.step = step


def _optimizer_state_to(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Adam's moments follow their parameters to the device (its step counts stay)."""
    for values in optimizer.state.values():
        for name, value in values.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                values[name] = value.to(device)


def _save_stage1(directory: Path, step: int, identity: tuple, net, noise, optimizer, gen,
                 history, schedule) -> None:  # fmt: skip
    """A resumable Stage-1 checkpoint ``directory/step-N`` (only the latest one is kept)."""
    target = directory / f"step-{step:09d}"
    if target.exists():
        return
    tensors, header = flow_state(net, noise)
    opt_tensors, opt_rest = optimizer_tensors(optimizer)
    components = {
        "flow": {k: v.detach().cpu() for k, v in tensors.items()},
        "optimizer": {k: v.detach().cpu() for k, v in opt_tensors.items()},
        "rng": {"generator": gen.get_state()},
        "history": {"loss": history.detach().cpu().float()},
    }
    extra = {"flow": header, "optimizer": opt_rest, "key": flow_key(*identity)}
    if schedule is not None:
        extra["schedule"] = schedule.state_dict()
    write_checkpoint(target, components, step=step, extra=extra)
    prune(directory, 1)


def _restore_stage1(directory: Path, n_items, flow_cfg, cfg, field, noise, optimizer):
    """(step, generator state, losses so far, lr-schedule state) from the latest Stage-1
    checkpoint, or None."""
    found = latest(directory)
    if found is None:
        return None
    components, manifest = read_checkpoint(found)
    extra = manifest["extra"]
    if extra.get("key") != flow_key(n_items, flow_cfg, cfg):
        raise BundleflowError(
            f"{found}: this Stage-1 checkpoint is of another flow or Stage-1 config; "
            "resume with the run's own config, or start a new run"
        )
    restored, restored_noise = flow_from_state(components["flow"], extra["flow"])
    field.load_state_dict(restored.state_dict())
    noise.load_state_dict(restored_noise.state_dict())
    load_optimizer_tensors(optimizer, components["optimizer"], extra["optimizer"])
    step = int(manifest["step"])
    logger.info("stage 1: resumed from {} (step {})", found, step)
    history = components["history"]["loss"]
    return step, components["rng"]["generator"], history, extra.get("schedule")


def save_flow(directory: Path, field: VelocityField, noise: MixtureNoise, extra: dict) -> Path:
    tensors, header = flow_state(field, noise)
    return write_checkpoint(
        directory, {"flow": tensors}, step=extra.get("steps", 0), extra={**extra, "flow": header}
    )


def load_flow(directory: Path) -> tuple[VelocityField, MixtureNoise, dict]:
    components, manifest = read_checkpoint(directory)
    if "flow" not in components:
        raise BundleflowError(f"{directory}: checkpoint holds no flow")
    field, noise = flow_from_state(components["flow"], manifest["extra"]["flow"])
    return field.eval().requires_grad_(False), noise, manifest


@contextlib.contextmanager
def _cache_lock(directory: Path):
    """An exclusive ``flock`` on ``<cache>/flows/<key>.lock`` for as long as the block runs.

    Two runs that need the same flow take turns: the second waits while the first trains
    and then finds the cached flow. The lock is released when the holder exits, killed
    included (the kernel drops it with the file descriptor).
    """
    lock_path = directory.with_name(f"{directory.name}.lock")
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        handle = lock_path.open("a")
    except OSError as err:  # a read-only cache: no sharing, but the run can still train
        logger.warning("cannot lock the flow cache {} ({}); not sharing it", lock_path, err)
        yield False
        return
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("stage 1: another process is training this flow; waiting for it")
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield True
    finally:
        handle.close()  # releases the lock


def _cached(directory: Path, key: str, *, locked: bool) -> tuple[VelocityField, dict] | None:
    if not directory.exists():
        return None
    try:
        field, _, manifest = load_flow(directory)
    except BundleflowError as err:
        if locked:  # only the lock holder may remove it; nobody else reads it meanwhile
            logger.warning("cached flow unusable ({}); training again", err)
            shutil.rmtree(directory, ignore_errors=True)
        return None
    logger.info("stage 1: using cached flow {}", directory)
    summary = manifest["extra"].get("summary", {})
    return field, {"key": key, "path": str(directory), "cached": True, **summary}


def get_flow(
    n_items: int,
    flow_cfg: FlowConfig,
    cfg: Stage1Config,
    device: torch.device,
    **train_kw,
) -> tuple[VelocityField, dict]:
    """The cached flow for this (m, flow config, Stage-1 config), trained on a miss.

    The cache entry is locked while it is looked up, trained and written, so concurrent
    runs never train the same flow twice nor see a half-written one.
    """
    key = flow_key(n_items, flow_cfg, cfg)
    directory = flow_cache_dir(key)
    hit = _cached(directory, key, locked=False)  # fast path, no lock
    if hit is not None:
        return hit
    with _cache_lock(directory) as locked:
        hit = _cached(directory, key, locked=locked)
        if hit is not None:
            return hit
        clean_stale(directory.parent)
        field, noise, summary = train_stage1(n_items, flow_cfg, cfg, device, **train_kw)
        if summary["steps"] == cfg.steps:  # only complete flows enter the shared cache
            try:
                save_flow(directory, field, noise, {"summary": summary, "key": key})
            except FileExistsError:
                logger.info("another run cached this flow first; keeping theirs")
            except BundleflowError as err:
                logger.warning("could not cache the flow: {}", err)
    return field, {"key": key, "path": str(directory), "cached": False, **summary}


def resolve_flow_ckpt(spec: str) -> Path:
    """``--flow-ckpt``: absolute, relative to the working directory or to $BUNDLEFLOW_HOME.

    Accepts a flow checkpoint directory, a run directory (its ``flow.json``), or the
    public code's ``.pth`` state dict. A miss lists every place tried.
    """
    raw = Path(spec).expanduser()
    tried = []
    candidates = [raw] if raw.is_absolute() else [Path.cwd() / raw]
    home = os.environ.get("BUNDLEFLOW_HOME")
    if home and not raw.is_absolute():
        candidates += [Path(home).expanduser() / raw, Path(home).expanduser() / "runs" / raw]
    for candidate in candidates:
        tried.append(str(candidate))
        if candidate.is_file() and candidate.suffix in (".pth", ".pt"):
            return candidate
        if (candidate / "manifest.json").is_file():
            return candidate
        if (candidate / FLOW_FILE).is_file():
            pointed = Path(json.loads((candidate / FLOW_FILE).read_text())["path"])
            tried.append(f"{pointed} (from {candidate / FLOW_FILE})")
            if (pointed / "manifest.json").is_file() or (
                pointed.is_file() and pointed.suffix in (".pth", ".pt")
            ):
                return pointed
    hint = "" if home else " (BUNDLEFLOW_HOME is not set)"
    raise BundleflowError(
        f"--flow-ckpt {spec!r} not found; tried: {'; '.join(tried)}{hint}. "
        "Produce one with `bundleflow train-stage1 --preset ...`"
    )


def load_flow_ckpt(spec: str, n_items: int) -> tuple[VelocityField, dict]:
    path = resolve_flow_ckpt(spec)
    if path.is_file():
        field = load_reference_flow(path, n_items=n_items).eval().requires_grad_(False)
        return field, {"path": str(path), "kind": "reference .pth"}
    field, _, manifest = load_flow(path)
    if field.n_items != n_items:
        raise BundleflowError(f"{path}: flow is for m={field.n_items}, the run has m={n_items}")
    return field, {"path": str(path), "key": manifest["extra"].get("key")}
