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

from bundleflow.errors import BundleflowError
from bundleflow.maths.flow import (
    MixtureNoise,
    VelocityField,
    flow_from_state,
    flow_state,
    load_reference_flow,
)
from bundleflow.paths import default_cache_dir
from bundleflow.system.progress import ProgressBar
from bundleflow.system.telemetry import gpu_status_line
from bundleflow.train.checkpoint import (
    clean_stale,
    latest,
    prune,
    read_checkpoint,
    write_checkpoint,
)
from bundleflow.train.config import FlowConfig, Stage1Config
from bundleflow.train.plan import stage1_mode
from bundleflow.train.signals import StopRequest
from bundleflow.train.stage1_step import PreparedStage1Step, Stage1Step

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


class Stage1Trainer:
    """Stage 1 as a recipe: :meth:`fit` steps, logs, checkpoints and returns the flow.

    One process (and Stage 1 in fp32, the default): the step is
    :class:`bundleflow.train.stage1_step.Stage1Step`, captured whole in a CUDA graph on a GPU
    and the plain loop bit for bit on the CPU. Several processes (DDP) or Accelerate's mixed
    precision: the same recipe through the prepared model, each rank on its slice of the same
    seeded global batch, drawn on the CPU.

    With ``checkpoint_dir`` (a run's ``stage1/``) :meth:`fit` writes a resumable checkpoint
    every ``cfg.checkpoint_every`` steps and at the end, and on SIGTERM/SIGINT finishes its
    step, writes one and raises :class:`Stage1Stopped`; ``resume`` continues from the latest
    one there (weights, Adam, the losses so far, the lr schedule and the generator's state:
    the same flow, bit for bit on the CPU, as a run never stopped).
    """

    def __init__(
        self,
        n_items: int,
        flow_cfg: FlowConfig,
        cfg: Stage1Config,
        device: torch.device,
        *,
        accelerator=None,
        metrics=None,
        show_progress: bool = True,
        checkpoint_dir: Path | None = None,
    ) -> None:
        built = time.monotonic()
        self.n_items, self.flow_cfg, self.cfg, self.device = n_items, flow_cfg, cfg, device
        self.metrics, self.checkpoint_dir = metrics, checkpoint_dir
        self.key = flow_key(n_items, flow_cfg, cfg)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.net = VelocityField(n_items, flow_cfg.hidden, flow_cfg.hidden2)
        self.noise = MixtureNoise(
            n_items, flow_cfg.n_components, flow_cfg.log_std, generator=self.gen
        )
        self.rank, self.world = 0, 1
        if accelerator is not None:
            self.rank, self.world = accelerator.process_index, accelerator.num_processes
        mixed = getattr(accelerator, "mixed_precision", "no")
        self.mode = stage1_mode(device, self.world, mixed)  # the plan's answer
        if self.mode.value == "ddp":
            self.stepper = PreparedStage1Step(
                self.net, self.noise, cfg, flow_cfg, accelerator, self.gen
            )
        else:
            self.stepper = Stage1Step(
                self.net, self.noise, cfg, flow_cfg, device, mode=self.mode.value,
                generator=self.gen if device.type == "cpu" else None,
            )  # fmt: skip
        self.history = self.stepper.history
        self.done = 0
        self.show = show_progress and self.rank == 0  # one bar, not one per process
        self.setup_seconds = time.monotonic() - built

    def step(self) -> None:
        """One optimizer step; its loss goes to ``history`` on the device (no host sync)."""
        self.done += 1
        self.stepper()

    def fit(self, *, max_time: float | None = None, resume: bool = False):
        """Train to ``cfg.steps`` (or ``max_time``); returns (field, mixture, summary)."""
        cfg = self.cfg
        if resume and self.checkpoint_dir is not None:
            self.restore()
        if self.world > 1 and max_time is not None:
            logger.warning("stage 1: --max-time is ignored under several processes")
            max_time = None
        bar = ProgressBar(cfg.steps, "stage 1", enabled=None if self.show else False, unit="steps")
        start, first = time.monotonic(), self.done
        self.logged = (first, start)  # the step and time of the last metrics line (step_time)
        stop = StopRequest() if self.checkpoint_dir is not None and self.world == 1 else None
        with stop if stop is not None else contextlib.nullcontext():
            while self.done < cfg.steps:
                self.step()
                self.log(start)
                if bar(self.done) and self.rank == 0:  # the progress-line cadence: 10% each
                    gpu = gpu_status_line(self.device)  # None off CUDA
                    if gpu is not None:
                        logger.info("stage 1 step {}: {}", self.done, gpu)
                if self.done % cfg.checkpoint_every == 0 or self.done == cfg.steps:
                    self.save()
                if stop is not None and stop.requested:
                    bar.close()
                    self.save()
                    raise Stage1Stopped(self.done)
                if max_time is not None and time.monotonic() - start > max_time:
                    logger.info("stage 1: --max-time reached after {} steps", self.done)
                    break
        bar.close()
        return self.finish(time.monotonic() - start, self.done - first)

    def log(self, start: float) -> None:
        cfg, step = self.cfg, self.done
        if step % cfg.log_every == 0 or step == cfg.steps:
            value = float(self.history[max(0, step - cfg.log_every) : step].mean())
            now, (last_step, last_time) = time.monotonic(), self.logged
            self.logged = (step, now)
            if self.metrics is not None:
                step_time = (now - last_time) / max(1, step - last_step)
                self.metrics(
                    stage=1, step=step, loss=value, wall_time=now - start, step_time=step_time
                )
            logger.debug("stage 1 step {} loss {:.5f}", step, value)

    def finish(self, seconds: float, steps_now: int):
        """The trained flow on the CPU, frozen, and a summary of the losses."""
        step = self.done
        self.net.to("cpu").eval().requires_grad_(False)
        self.noise.to("cpu")
        # Disjoint windows (at most 20 first / 100 last steps), so a short run still compares
        # its start with its end instead of averaging the same steps twice.
        half = max(1, step // 2)
        first = float(self.history[: min(20, half)].mean())
        last = float(self.history[step - min(100, half) : step].mean())
        mode = self.stepper.mode
        summary = {
            "steps": step,
            "loss_first": first,
            "loss_last": last,
            "wall_time": seconds,
            "step_mode": mode,
            "setup_seconds": round(self.setup_seconds, 3),
        }
        if steps_now:
            summary["ms_per_step"] = round(1e3 * seconds / steps_now, 4)
        logger.info(
            "stage 1: {} steps ({}), loss {:.4f} -> {:.4f}, {:.1f} s",
            step,
            mode,
            first,
            last,
            seconds,
        )
        return self.net, self.noise, summary

    # -- checkpoints -----------------------------------------------------------------------

    def save(self) -> None:
        """A resumable checkpoint ``checkpoint_dir/step-N`` (only the latest is kept)."""
        if self.checkpoint_dir is None or self.rank != 0:
            return
        target = self.checkpoint_dir / f"step-{self.done:09d}"
        if target.exists():
            return
        tensors, header = flow_state(self.net, self.noise)
        saved = self.stepper.checkpoint()
        opt_tensors, opt_rest = saved["optimizer"]
        rng, history, schedule = saved["rng"], saved["history"], saved["schedule"]
        components = {
            "flow": {k: v.detach().cpu() for k, v in tensors.items()},
            "optimizer": {k: v.detach().cpu() for k, v in opt_tensors.items()},
            "rng": {"generator": rng},
            "history": {"loss": history.float()},
        }
        extra = {"flow": header, "optimizer": opt_rest, "key": self.key, "schedule": schedule}
        write_checkpoint(target, components, step=self.done, extra=extra)
        prune(self.checkpoint_dir, 1)

    def restore(self) -> None:
        """Continue from the latest checkpoint in ``checkpoint_dir``, if there is one."""
        found = latest(self.checkpoint_dir)
        if found is None:
            return
        components, manifest = read_checkpoint(found)
        extra = manifest["extra"]
        if extra.get("key") != self.key:
            raise BundleflowError(
                f"{found}: this Stage-1 checkpoint is of another flow or Stage-1 config; "
                "resume with the run's own config, or start a new run"
            )
        field, noise = flow_from_state(components["flow"], extra["flow"])
        with torch.no_grad():  # in place: a captured step reads these tensors
            for mine, theirs in zip(self.net.parameters(), field.parameters(), strict=True):
                mine.copy_(theirs)
            self.noise.means.copy_(noise.means)
        step = int(manifest["step"])
        saved = {
            "optimizer": (components["optimizer"], extra["optimizer"]),
            "rng": components["rng"]["generator"],
            "history": components["history"]["loss"],
            "schedule": extra.get("schedule"),
        }
        self.stepper.restore(step, saved)
        self.done = step
        logger.info("stage 1: resumed from {} (step {})", found, step)


class Stage1Stopped(Exception):
    """Stage 1 stopped by a signal after writing a checkpoint of ``step``."""

    def __init__(self, step: int) -> None:
        super().__init__(f"stage 1 stopped by a signal at step {step}")
        self.step = step


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
    """Train a Stage-1 flow (:class:`Stage1Trainer`); returns the field, mixture, summary."""
    trainer = Stage1Trainer(
        n_items,
        flow_cfg,
        cfg,
        device,
        accelerator=accelerator,
        metrics=metrics,
        show_progress=show_progress,
        checkpoint_dir=checkpoint_dir,
    )
    return trainer.fit(max_time=max_time, resume=resume)


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
    accelerator = train_kw.get("accelerator")
    if accelerator is not None and accelerator.num_processes > 1:
        return _get_flow_together(n_items, flow_cfg, cfg, device, key, **train_kw)
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
                saving = time.monotonic()
                save_flow(directory, field, noise, {"summary": summary, "key": key})
                logger.info(
                    "stage 1: flow cached in {} ({:.1f} s)", directory, time.monotonic() - saving
                )
            except FileExistsError:
                logger.info("another run cached this flow first; keeping theirs")
            except BundleflowError as err:
                logger.warning("could not cache the flow: {}", err)
    return field, {"key": key, "path": str(directory), "cached": False, **summary}


def _get_flow_together(
    n_items: int, flow_cfg: FlowConfig, cfg: Stage1Config, device: torch.device, key: str,
    **train_kw,
) -> tuple[VelocityField, dict]:  # fmt: skip
    """Several processes: the main process looks in the cache (a damaged entry is named and
    trained again, never used); on a miss every rank trains Stage 1 together (DDP) and only
    the main process writes the cache entry."""
    from accelerate.utils import broadcast_object_list

    accelerator = train_kw["accelerator"]
    directory = flow_cache_dir(key)
    main = accelerator.is_main_process
    hit = [_cached(directory, key, locked=True) is not None if main else None]
    if broadcast_object_list(hit, from_process=0)[0]:
        field, _, manifest = load_flow(directory)
        return field, {"key": key, "path": str(directory), "cached": True}
    show = train_kw.pop("show_progress", True) and main
    field, noise, summary = train_stage1(
        n_items, flow_cfg, cfg, device, show_progress=show, **train_kw
    )
    if main:
        try:
            save_flow(directory, field, noise, {"summary": summary, "key": key})
        except (FileExistsError, OSError) as err:
            logger.warning("flow not cached in {}: {}", directory, err)
    accelerator.wait_for_everyone()
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
