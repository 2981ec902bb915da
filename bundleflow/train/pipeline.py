"""A whole job, from a :class:`~bundleflow.train.launch.Launch` to the report.

``bundleflow train`` (and ``train-stage2``) is :func:`train`: resolve the config and the
plan, open the run directory, read the data, take the flow (``--flow-ckpt``, the cache, or
Stage 1 now), fit Stage 2, evaluate the frozen mechanism against the baselines fitted once on
the training split, write the report. ``bundleflow train-stage1`` is :func:`train_stage1`.
The command line only builds the launch and prints what these return.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from loguru import logger

from bundleflow.errors import BundleflowError
from bundleflow.evaluation.evaluate import evaluate_mechanism
from bundleflow.evaluation.report import (
    comparison_cells,
    eager_line,
    format_summary,
    write_run_report,
)
from bundleflow.paths import runs_root
from bundleflow.system.devices import resolve_device
from bundleflow.system.distributed import gloo_threads
from bundleflow.system.timing import Timings
from bundleflow.system.tracking import check_available, open_tracker, report_scalars
from bundleflow.train.checkpoint import latest
from bundleflow.train.config import Config, to_dict
from bundleflow.train.data import RunData, load_run_data
from bundleflow.train.launch import Launch, Resolved, resolve, stage1_only
from bundleflow.train.plan import StepPlan, resolve_plan
from bundleflow.train.run import (
    CONFIG_FILE,
    Run,
    Session,
    make_accelerator,
    open_run,
    resume_command,
)
from bundleflow.train.stage1 import FLOW_FILE, Stage1Stopped, get_flow, load_flow_ckpt
from bundleflow.train.stage2 import BEST, CHECKPOINTS, Stage2Trainer

STAGE1_CHECKPOINTS = "stage1"


@dataclass
class Job:
    """One process's view of a started run: what :func:`start` set up."""

    resolved: Resolved
    accelerator: object
    run: Run
    plan: StepPlan

    @property
    def config(self) -> Config:
        return self.resolved.config

    @property
    def launch(self) -> Launch:
        return self.resolved.launch

    @property
    def resumed(self) -> bool:
        return self.launch.resume is not None

    def resume_hint(self) -> str:
        return resume_command(
            self.run.dir, self.launch.command, no_progress=self.launch.no_progress
        )

    def stage1_kw(self) -> dict:
        """How this job trains Stage 1 (:func:`bundleflow.train.stage1.get_flow`)."""
        return {
            "accelerator": self.accelerator,
            "metrics": self.run.metrics,
            "show_progress": not self.launch.no_progress,
            "checkpoint_dir": self.run.dir / STAGE1_CHECKPOINTS,
            "resume": self.resumed,
        }


def start(launch: Launch) -> Job:
    """Config, device, accelerator, the plan (refused here, before anything is written, when
    a setting cannot run on this machine) and the run directory."""
    resolved = resolve(launch)
    config = resolved.config
    check_available(resolved.record["report_to"])  # a missing package: exit 2 before any work
    choice = resolve_device(config.device)
    logger.info("device: {} ({})", choice.device, choice.reason)
    accelerator = make_accelerator(config, choice.device)
    plan = resolve_plan(
        config,
        accelerator.device,
        processes=accelerator.num_processes,
        has_pool=config.data.kind != "additive",
    )
    if accelerator.num_processes > 1:
        logger.info(
            "process {} of {} on {}",
            accelerator.process_index,
            accelerator.num_processes,
            accelerator.device,
        )
    run = _open_shared_run(launch, config, accelerator)
    if launch.resume is not None:
        resumes = [*run.info.get("resumes", []), {"at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                   "command": launch.argv}]  # fmt: skip
        run.update_info(resumes=resumes)
    else:
        run.update_info(command=launch.argv)
    run.update_info(
        launch=resolved.record, device=str(accelerator.device), device_reason=choice.reason
    )
    logger.info("run directory: {}", run.dir)
    return Job(resolved, accelerator, run, plan)


def _open_shared_run(launch: Launch, config: Config, accelerator) -> Run:
    """The main process creates (or reopens) the run directory; the others learn its path."""
    main = accelerator.is_main_process
    resume = Path(launch.resume) if launch.resume else None
    run = None
    if main:
        run = open_run(runs_root(launch.runs_dir), config, main_process=True, resume=resume)
    if accelerator.num_processes == 1:
        return run
    from accelerate.utils import broadcast_object_list

    shared = broadcast_object_list([str(run.dir) if main else None], from_process=0)
    if main:
        return run
    return Run(dir=Path(shared[0]), config=config, main_process=False)


def _flow_for(job: Job, n_items: int):
    """``--flow-ckpt``; a resumed run's own flow; else the cached flow, trained on a miss."""
    flow_ckpt, run = job.launch.flow_ckpt, job.run
    recorded = run.dir / FLOW_FILE
    if not flow_ckpt and job.resumed and recorded.is_file():
        # The resumed menu continues with the flow it was trained with (perhaps a
        # --flow-ckpt), not with whatever the config would train or find in the cache now.
        # Only a cache entry that has since been deleted is rebuilt (same content key).
        info = json.loads(recorded.read_text())
        if "cached" not in info or Path(info["path"]).exists():
            flow_ckpt = str(run.dir)
    if flow_ckpt:
        field, info = load_flow_ckpt(flow_ckpt, n_items)
    else:
        cfg = job.config
        field, info = get_flow(n_items, cfg.flow, cfg.stage1, job.accelerator.device,
                               **job.stage1_kw())  # fmt: skip
    run.write_json(FLOW_FILE, info)
    return field, info


def _start_tracking(job: Job) -> None:
    """``--report-to``: the run's tracker (every metrics line goes there too, see Run.metrics)
    with the resolved config as hyperparameters. A resumed run continues where it was."""
    report_to, run, config = job.resolved.record["report_to"], job.run, job.config
    if report_to == "none" or not run.main_process:
        return
    run.tracker = open_tracker(report_to, run.dir, to_dict(config))
    run.tracker.log_hparams(to_dict(config), (run.dir / CONFIG_FILE).read_text())
    logger.info("reporting to {}: {}", report_to, run.tracker.where)


@contextlib.contextmanager
def _guarded(job: Job) -> Iterator[None]:
    """Close the run; on a user error before anything was trained, remove the new run
    directory so no half-written run is left behind (checkpoints and flows are kept)."""
    run = job.run
    try:
        yield
    except BundleflowError:
        run.close()
        kept = (CHECKPOINTS, BEST, FLOW_FILE, STAGE1_CHECKPOINTS)
        produced = any((run.dir / name).exists() for name in kept)
        if not job.resumed and run.main_process and not produced:
            shutil.rmtree(run.dir, ignore_errors=True)
        raise
    finally:
        run.close()


@contextlib.contextmanager
def _stage1_stop(job: Job) -> Iterator[None]:
    """Ctrl-C / SIGTERM in Stage 1: the loop wrote a checkpoint; say how to resume, exit 0."""
    try:
        yield
    except Stage1Stopped as stopped:
        logger.warning(
            "stopped by a signal in stage 1 at step {}; checkpoint written; resume with: {}",
            stopped.step,
            job.resume_hint(),
        )


def train_stage1(launch: Launch) -> None:
    """``bundleflow train-stage1``: the cached flow for the config, trained on a miss."""
    job = start(launch)
    with _guarded(job), _stage1_stop(job):
        _start_tracking(job)
        config = stage1_only(job.resolved).config
        started = time.monotonic()
        _, info = get_flow(config.data.n_items, config.flow, config.stage1,
                           job.accelerator.device, max_time=job.resolved.max_time,
                           **job.stage1_kw())  # fmt: skip
        job.run.write_json(FLOW_FILE, info)
        job.run.update_info(stage1={**info, "wall_time": time.monotonic() - started})
        logger.info("flow: {} (use it with --flow-ckpt {})", info["path"], job.run.dir)
    _end(job.accelerator)


def train(launch: Launch) -> str | None:
    """``bundleflow train`` / ``train-stage2``: the whole job. Returns the result text (the
    summary table and the time breakdown) when this process evaluated, else None (a signal
    stopped it with a checkpoint written, or another rank evaluates)."""
    job = start(launch)
    timings = Timings()
    with _guarded(job), Session(job.run, timings.total, job.resume_hint()) as session:
        _start_tracking(job)
        with timings.section("data"), job.accelerator.main_process_first():  # one process
            data = load_run_data(  # generates a cached data set, the others wait
                job.config.data, job.accelerator.device, dataset=job.resolved.dataset
            )
        _record_data(job, data.info)
        flow_info = None
        with timings.section("stage 1"), _stage1_stop(job):
            field, flow_info = _flow_for(job, data.n_items)
        if flow_info is None:  # a signal in Stage 1 (checkpoint written)
            return _end(job.accelerator)
        job.run.update_info(flow=flow_info)
        result, plan = _fit_stage2(job, field, data, timings)
        if result.mechanism is None:  # stopped by a signal (checkpoint written) or not main
            if result.stop_reason == "signal" and job.run.main_process:
                logger.warning("resume with: {}", job.resume_hint())
            return _end(job.accelerator)
        with timings.section("baselines"):
            report = _evaluate(job, result, data, plan)
        with timings.section("report"):
            segments = session.close("finished")
            report.update(
                wall_time=sum(seg["wall_time"] for seg in segments),
                segments=segments,
                time_breakdown=timings.as_dict(),
            )
            write_report(job.run, report)
        job.run.update_info(time_breakdown=timings.as_dict())
    _end(job.accelerator)
    return format_summary(report) + "\n" + timings.format()


def _fit_stage2(job: Job, field, data: RunData, timings: Timings):
    """Stage 2 in the plan's mode; what the run learned about the plan goes into run.json."""
    logger.info("stage 2: {}", job.plan.describe())
    job.run.update_info(step_plan=job.plan.to_dict())
    started = time.monotonic()
    trainer = Stage2Trainer(
        job.config, field, data, job.plan, run=job.run, accelerator=job.accelerator,
        show_progress=not job.launch.no_progress,
    )  # fmt: skip
    plan = job.plan
    try:
        result = trainer.fit(
            max_steps=job.resolved.max_steps,
            max_time=job.resolved.max_time,
            # a run stopped in Stage 1 has no Stage-2 checkpoint yet: Stage 2 starts afresh
            resume=job.resumed and latest(job.run.dir / CHECKPOINTS) is not None,
        )
    finally:
        plan = _record_eager(job.run, plan, trainer)
    elapsed = time.monotonic() - started
    timings.add("stage 2", elapsed - result.validation_time)
    timings.add("validation", result.validation_time)
    return result, plan


def _evaluate(job: Job, result, data: RunData, plan: StepPlan) -> dict:
    """The frozen mechanism on the test split against the baselines (fitted once per
    training split and shared with the posted-price option: the data cache holds the fit)."""
    device = job.accelerator.device
    report = evaluate_mechanism(
        result.mechanism,
        data.test,
        data.train_user,
        batch_size=65536 if data.kind == "additive" else job.config.eval.batch_size,
        fitted=data.baselines(),
        known=data.info.get("known"),
        device=device if device.type == "cuda" else None,
    )
    report.update(
        run=str(job.run.dir),
        device=str(device),
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        stage2={
            "steps": result.steps,
            "best_step": result.best_step,
            "stop_reason": result.stop_reason,
            "best_val_revenue": result.best_val_revenue,
            "wall_time": result.wall_time,
        },
        step_plan=plan.to_dict(),
    )
    return report


def _record_eager(run: Run, plan: StepPlan, trainer: Stage2Trainer) -> StepPlan:
    """The plan with what the run learned: a failed torch.compile (the step, the fused
    kernels or Adam ran eager) is a finding in run.json's ``step_plan`` and the report,
    with the fix, not only a warning in the log."""
    after = plan.after_run(trainer.step_fn, trainer.optimizer)
    if after.eager is not None:
        logger.warning(eager_line({"step_plan": after.to_dict()}))
    if after != plan:
        run.update_info(step_plan=after.to_dict())
    return after


def _record_data(job: Job, info: dict) -> None:
    """The run's data in run.json (and, for a --data file, its sha256 in the launch record);
    a resumed run must have the data it started with."""
    run, record = job.run, job.resolved.record
    was = (run.info.get("data") or {}).get("sha256")
    now = info.get("sha256")
    if job.resumed and was and now and was != now:
        raise BundleflowError(
            f"--resume {run.dir}: its data were {(run.info.get('data') or {}).get('path')} "
            f"(sha256 {was[:12]}...), now {info.get('path')} has sha256 {now[:12]}...; "
            "restore those data or start a new run"
        )
    run.update_info(data=info)
    if record.get("data") and not record.get("data_sha256"):
        record["data_sha256"] = info.get("sha256")
        run.update_info(launch=record)


def _end(accelerator) -> None:
    """Several processes: wait until every rank is done (the main one evaluates and writes
    the report after the others have finished), then leave the process group together (NCCL
    warns when it is not destroyed; a rank destroying it alone can abort the others)."""
    if accelerator.num_processes > 1:
        accelerator.wait_for_everyone()
        accelerator.end_training()
        if gloo_threads():  # issue 28: a holder of the group keeps them alive past exit
            logger.warning("process group left with Gloo threads running: {}", gloo_threads())


def write_report(run: Run, report: dict) -> None:
    """report.json, report.md and the plots (bundleflow.evaluation.report); the tracker's copy."""
    write_run_report(run.dir, report, main_process=run.main_process)
    if run.tracker is not None:
        step = (report.get("stage2") or {}).get("steps")
        summary = format_summary(report, table=False)
        run.tracker.log_report(summary, comparison_cells(report), report_scalars(report), step)
