"""`bundleflow train | train-stage1 | train-stage2` (evaluate and menu: cli.evaluate)."""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import time
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
from bundleflow.system.tracking import REPORT_TO, check_available, open_tracker, report_scalars
from bundleflow.train.checkpoint import latest
from bundleflow.train.config import Config, load_config, parse_set, replace, to_dict, to_flat_dict
from bundleflow.train.data import fitted_baselines, load_run_data
from bundleflow.train.plan import StepPlan, resolve_plan
from bundleflow.train.run import (
    CONFIG_FILE,
    RUN_INFO,
    Run,
    Session,
    check_budgets,
    check_config_budgets,
    make_accelerator,
    open_run,
    resume_command,
)
from bundleflow.train.stage1 import FLOW_FILE, Stage1Stopped, get_flow, load_flow_ckpt
from bundleflow.train.stage2 import BEST, CHECKPOINTS, Stage2Trainer
from bundleflow.valuations import io as data_io

DEFAULT_PRESET = "default"
LAUNCH = "launch"  # run.json: the flags the run was started with (restored by --resume)
STAGE1_CHECKPOINTS = "stage1"


def add_config_args(p: argparse.ArgumentParser) -> None:
    """--preset, --set, --data, --device: what every command that builds a config takes."""
    p.add_argument(
        "--preset",
        default=None,
        help=f"preset name (`bundleflow presets`) or a YAML path (default: {DEFAULT_PRESET})",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        metavar="KEY=VALUE",
        help="override one config key (dotted, YAML value); repeatable",
    )
    p.add_argument(
        "--data",
        help="a data file (ours, reference .pt/zip, CATS text); its m and money scale are used "
        "unless --set data.n_items / data.money_scale say otherwise",
    )
    p.add_argument("--device", help="auto (default), cuda, cuda:N, mps or cpu")


def _common(p: argparse.ArgumentParser) -> None:
    add_config_args(p)
    p.add_argument("--runs-dir", help="root of run directories (default $BUNDLEFLOW_HOME/runs)")
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue a run from its last checkpoint, with every flag it was started with",
    )
    p.add_argument("--max-steps", type=int, help="stop this stage after N steps")
    p.add_argument("--max-time", type=float, help="stop Stage 2 after this many seconds")
    p.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"))
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--report-to",
        choices=REPORT_TO,
        help="also send metrics, config and report to TensorBoard (RUN_DIR/tensorboard; "
        "pip install 'bundleflow[tracking]') or W&B (default: none)",
    )


def register(sub: argparse._SubParsersAction) -> None:
    for name, func, doc in (
        ("train", cmd_train, "train Stage 1 (or take the cached flow), Stage 2, and evaluate"),
        ("train-stage1", cmd_train_stage1, "train (or fetch from the cache) the Stage-1 flow"),
        ("train-stage2", cmd_train_stage2, "train the menu with a given or cached flow"),
    ):
        p = sub.add_parser(name, help=doc, description=doc)
        _common(p)
        if name == "train-stage2":
            p.add_argument("--flow-ckpt", help="flow checkpoint dir, run dir, or reference .pth")
        p.set_defaults(func=func)


# --------------------------------------------------------------------------- config & setup


def resolve_config(args: argparse.Namespace) -> Config:
    """Defaults < preset < --set < flags (env/.env only hold paths, never hyper-parameters).

    A new run records the flags it was started with (``args.launch``, written to run.json);
    ``--resume`` restores them from there and refuses a flag that contradicts them.
    """
    check_budgets(args.max_steps, args.max_time)
    overrides = parse_set(args.overrides)
    if args.device:
        overrides["device"] = args.device
    if args.mixed_precision:
        overrides["mixed_precision"] = args.mixed_precision
    if args.resume:
        return _resume_config(args, overrides)
    if args.data:
        take_data_file(args, overrides)
    config = load_config(args.preset or DEFAULT_PRESET, overrides)
    check_config_budgets(config)
    args.launch = {
        "command": getattr(args, "command", None),
        "preset": args.preset or DEFAULT_PRESET,
        "set": list(args.overrides or []),
        "data": config.data.path if args.data else None,
        "data_sha256": None,  # filled in once the data are read
        "max_steps": args.max_steps,
        "max_time": args.max_time,
        "device": args.device,
        "mixed_precision": args.mixed_precision,
        "flow_ckpt": getattr(args, "flow_ckpt", None),
        "report_to": args.report_to or "none",
    }
    return config


def _data_path(flag: str) -> Path:
    """``--data FILE`` as a path that is a file; a missing path or a directory is a user
    error saying which."""
    path = Path(flag).expanduser()
    if path.is_dir():
        raise BundleflowError(
            f"--data {flag}: is a directory; pass a data file (.safetensors, .pt/.pth, .zip, "
            ".txt/.cats), e.g. one `bundleflow data generate --out FILE` wrote"
        )
    if not path.is_file():
        raise BundleflowError(f"--data {flag}: no such file")
    return path


def take_data_file(args: argparse.Namespace, overrides: dict) -> None:
    """``--data FILE``: the run's data are the file (recorded in the config as kind ``file``
    with its absolute path, so a resumed run reads it again), m is the file's and the money
    scale is the file's training mean unless the user set them."""
    path = _data_path(args.data)
    dataset = data_io.load_dataset(path)  # one clear error naming the file if it is bad
    args.dataset = dataset
    data = overrides.setdefault("data", {})
    if not isinstance(data, dict):
        raise BundleflowError("--set data=...: 'data' is a section; set data.KEY=VALUE")
    wanted = data.get("n_items")
    if wanted is not None and wanted != dataset.n_items:
        raise BundleflowError(
            f"{path}: the file has m={dataset.n_items} items but --set data.n_items={wanted}; "
            "drop that --set (m comes from the file) or use a file with that many items"
        )
    data.update(n_items=dataset.n_items, kind="file", path=str(path.resolve()))
    data.setdefault("money_scale", None)


def _read_run_info(run_dir: Path) -> dict:
    if not run_dir.is_dir():
        raise BundleflowError(
            f"--resume {run_dir}: no such run directory (runs are under "
            f"{runs_root(None)}; pass the directory `bundleflow train` printed)"
        )
    info_path = run_dir / RUN_INFO
    if not info_path.is_file() or not (run_dir / CONFIG_FILE).is_file():
        raise BundleflowError(
            f"--resume {run_dir}: not a bundleflow run directory (no {RUN_INFO} / {CONFIG_FILE})"
        )
    try:
        info = json.loads(info_path.read_bytes())
    except (ValueError, OSError) as err:
        raise BundleflowError(f"{info_path}: unreadable ({err}); the run is damaged") from None
    if not isinstance(info, dict):
        raise BundleflowError(f"{info_path}: not a JSON object; the run is damaged")
    return info


def _legacy_launch(info: dict) -> dict:
    """What a run written before run records can tell: its data file, from run.json."""
    data = info.get("data") or {}
    if data.get("kind") == "file":
        return {"data": data.get("path"), "data_sha256": data.get("sha256")}
    return {}


def _resume_config(args: argparse.Namespace, overrides: dict) -> Config:
    """The run's own config and flags; a flag given again must agree with the record."""
    run_dir = Path(args.resume)
    info = _read_run_info(run_dir)
    launch = dict(info.get(LAUNCH) or _legacy_launch(info))
    saved = str(run_dir / CONFIG_FILE)
    recorded = load_config(saved)
    if launch.get("data") and recorded.data.kind != "file":  # a run from before the record
        recorded = replace(recorded, data={"kind": "file", "path": launch["data"]})
    conflicts = []

    def conflict(flag: str, given, was) -> None:
        conflicts.append(f"{flag} {given} contradicts the run's {flag} {was}")

    if args.preset is not None and args.preset != launch.get("preset", args.preset):
        conflict("--preset", args.preset, launch["preset"])
    if overrides:
        asked = to_flat_dict(replace(recorded, **overrides))  # validates keys and types
        have = to_flat_dict(recorded)
        for key in sorted(k for k in asked if asked[k] != have[k]):
            flag = {"device": "--device", "mixed_precision": "--mixed-precision"}.get(key)
            if flag and getattr(args, key) is not None:
                conflict(flag, asked[key], have[key])
            else:
                conflict("--set", f"{key}={asked[key]}", f"{key}={have[key]}")
    recorded_sha = launch.get("data_sha256") or (info.get("data") or {}).get("sha256")
    if args.data:
        path = _data_path(args.data).resolve()
        sha = data_io.file_sha256(path)
        if recorded.data.kind != "file":
            conflict("--data", path, "generated data (it was started without --data)")
        elif sha != recorded_sha:
            conflict(
                "--data", f"{path} (sha256 {sha[:12]})", f"{recorded.data.path} "
                f"(sha256 {str(recorded_sha)[:12]})"
            )  # fmt: skip
        elif str(path) != recorded.data.path:  # the same content, moved: read it from here
            logger.info("data file moved: {} -> {} (same sha256)", recorded.data.path, path)
            recorded = replace(recorded, data={"path": str(path)})
            launch["data"] = str(path)
    elif recorded.data.kind == "file":
        _check_recorded_data(Path(recorded.data.path), recorded_sha)
    for flag, attr in (("--max-steps", "max_steps"), ("--max-time", "max_time")):
        given, was = getattr(args, attr), launch.get(attr)
        if given is None:
            setattr(args, attr, was)
        elif was is not None and given != was:
            conflict(flag, given, was)
        elif was is None:  # a budget the run had none of: this continuation's, recorded
            logger.info("{} {}: a new budget for this run (it was started without)", flag, given)
            launch[attr] = given
    was = launch.get("report_to") or "none"  # where metrics go changes no result: may change
    if args.report_to is not None and args.report_to != was:
        logger.info("--report-to {}: this run reported to {} until now", args.report_to, was)
    launch["report_to"] = args.report_to or was
    flow_ckpt = getattr(args, "flow_ckpt", None)
    if flow_ckpt and flow_ckpt != launch.get("flow_ckpt"):
        conflict("--flow-ckpt", flow_ckpt, launch.get("flow_ckpt") or "(none: its own Stage 1)")
    if conflicts:
        raise BundleflowError(
            f"--resume {run_dir}: " + "; ".join(conflicts) + ". Drop those flags to continue the "
            "run as it was started, or start a new run"
        )
    args.launch = launch
    return recorded


def _check_recorded_data(path: Path, sha: str | None) -> None:
    if not path.is_file():
        raise BundleflowError(
            f"--resume: the run was trained on {path}, which is gone; pass --data FILE with "
            f"the same content (sha256 {str(sha)[:12]}...) or start a new run"
        )
    if sha is not None and data_io.file_sha256(path) != sha:
        raise BundleflowError(
            f"--resume: {path} has changed since the run started (sha256 {sha[:12]}... then, "
            f"{data_io.file_sha256(path)[:12]}... now); restore the file or start a new run"
        )


def _setup(args: argparse.Namespace):
    config = resolve_config(args)
    check_available(args.launch["report_to"])  # a missing package: exit 2 before any work
    choice = resolve_device(config.device)
    logger.info("device: {} ({})", choice.device, choice.reason)
    accelerator = make_accelerator(config, choice.device)
    # How Stage 2's step runs, decided once (and refused here, before anything is written,
    # when a setting cannot run on this machine).
    args.plan = resolve_plan(
        config,
        accelerator.device,
        processes=accelerator.num_processes,
        has_pool=config.data.kind != "additive",
    )
    resume = Path(args.resume) if args.resume else None
    if accelerator.num_processes > 1:
        logger.info(
            "process {} of {} on {}",
            accelerator.process_index,
            accelerator.num_processes,
            accelerator.device,
        )
    run = _open_shared_run(args, config, accelerator, resume)
    if resume is not None:
        resumes = [*run.info.get("resumes", []), {"at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                   "command": " ".join(sys.argv)}]  # fmt: skip
        run.update_info(resumes=resumes)
    else:
        run.update_info(command=" ".join(sys.argv))
    run.update_info(launch=args.launch, device=str(accelerator.device), device_reason=choice.reason)
    logger.info("run directory: {}", run.dir)
    return config, accelerator, run


def _open_shared_run(args, config: Config, accelerator, resume: Path | None) -> Run:
    """The main process creates (or reopens) the run directory; the others learn its path."""
    main = accelerator.is_main_process
    run = None
    if main:
        run = open_run(runs_root(args.runs_dir), config, main_process=True, resume=resume)
    if accelerator.num_processes == 1:
        return run
    from accelerate.utils import broadcast_object_list

    shared = broadcast_object_list([str(run.dir) if main else None], from_process=0)
    if main:
        return run
    return Run(dir=Path(shared[0]), config=config, main_process=False)


def _flow_for(config: Config, args, accelerator, run: Run, n_items: int):
    flow_ckpt = getattr(args, "flow_ckpt", None)
    recorded = run.dir / FLOW_FILE
    if not flow_ckpt and args.resume and recorded.is_file():
        # The resumed menu continues with the flow it was trained with (perhaps a
        # --flow-ckpt), not with whatever the config would train or find in the cache now.
        # Only a cache entry that has since been deleted is rebuilt (same content key).
        info = json.loads(recorded.read_text())
        if "cached" not in info or Path(info["path"]).exists():
            flow_ckpt = str(run.dir)
    if flow_ckpt:
        field, info = load_flow_ckpt(flow_ckpt, n_items)
    elif accelerator.num_processes > 1:
        field, info = _shared_flow(config, args, accelerator, run, n_items)
    else:
        stage1 = config.stage1
        field, info = get_flow(
            n_items,
            config.flow,
            stage1,
            accelerator.device,
            accelerator=accelerator,
            metrics=run.metrics,
            show_progress=not args.no_progress,
            checkpoint_dir=run.dir / STAGE1_CHECKPOINTS,
            resume=args.resume is not None,
        )
    run.write_json(FLOW_FILE, info)
    return field, info


def _shared_flow(config: Config, args, accelerator, run: Run, n_items: int):
    """Several processes: the main process looks in the cache; on a miss every rank trains
    Stage 1 together (DDP) and only the main process writes the cache entry."""
    from accelerate.utils import broadcast_object_list

    from bundleflow.train.stage1 import flow_cache_dir, flow_key, load_flow, save_flow, train_stage1

    key = flow_key(n_items, config.flow, config.stage1)
    directory = flow_cache_dir(key)
    hit = [directory.exists() if accelerator.is_main_process else None]
    if hit[0]:  # a damaged entry is named and trained again, never used (issue 28)
        try:
            load_flow(directory)
        except BundleflowError as err:
            logger.warning("cached flow unusable ({}); training again", err)
            shutil.rmtree(directory, ignore_errors=True)
            hit = [False]
    if broadcast_object_list(hit, from_process=0)[0]:
        field, _, manifest = load_flow(directory)
        return field, {"key": key, "path": str(directory), "cached": True}
    field, noise, summary = train_stage1(
        n_items,
        config.flow,
        config.stage1,
        accelerator.device,
        accelerator=accelerator,
        metrics=run.metrics,
        show_progress=not args.no_progress and accelerator.is_main_process,
        checkpoint_dir=run.dir / STAGE1_CHECKPOINTS,
        resume=args.resume is not None,
    )
    if accelerator.is_main_process:
        try:
            save_flow(directory, field, noise, {"summary": summary, "key": key})
        except (FileExistsError, OSError) as err:
            logger.warning("flow not cached in {}: {}", directory, err)
    accelerator.wait_for_everyone()
    return field, {"key": key, "path": str(directory), "cached": False, **summary}


# --------------------------------------------------------------------------- commands


def _start_tracking(args: argparse.Namespace, config: Config, run: Run) -> None:
    """``--report-to``: the run's tracker (every metrics line goes there too, see Run.metrics)
    with the resolved config as hyperparameters. A resumed run continues where it was."""
    report_to = args.launch["report_to"]
    if report_to == "none" or not run.main_process:
        return
    run.tracker = open_tracker(report_to, run.dir, to_dict(config))
    run.tracker.log_hparams(to_dict(config), (run.dir / CONFIG_FILE).read_text())
    logger.info("reporting to {}: {}", report_to, run.tracker.where)


@contextlib.contextmanager
def _guarded(run: Run, *, resumed: bool):
    """Close the run; on a user error before anything was trained, remove the new run
    directory so no half-written run is left behind (checkpoints and flows are kept)."""
    try:
        yield
    except BundleflowError:
        run.close()
        kept = (CHECKPOINTS, BEST, FLOW_FILE, STAGE1_CHECKPOINTS)
        produced = any((run.dir / name).exists() for name in kept)
        if not resumed and run.main_process and not produced:
            shutil.rmtree(run.dir, ignore_errors=True)
        raise
    finally:
        run.close()


def cmd_train_stage1(args: argparse.Namespace) -> int:
    config, accelerator, run = _setup(args)
    with _guarded(run, resumed=args.resume is not None), _stage1_stop(run, args):
        _start_tracking(args, config, run)
        if args.max_steps:
            config = replace(config, stage1={"steps": args.max_steps})
        started = time.monotonic()
        _, info = get_flow(
            config.data.n_items,
            config.flow,
            config.stage1,
            accelerator.device,
            accelerator=accelerator,
            metrics=run.metrics,
            max_time=args.max_time,
            show_progress=not args.no_progress,
            checkpoint_dir=run.dir / STAGE1_CHECKPOINTS,
            resume=args.resume is not None,
        )
        run.write_json(FLOW_FILE, info)
        run.update_info(stage1={**info, "wall_time": time.monotonic() - started})
        logger.info("flow: {} (use it with --flow-ckpt {})", info["path"], run.dir)
    _end(accelerator)
    return 0


@contextlib.contextmanager
def _stage1_stop(run: Run, args: argparse.Namespace):
    """Ctrl-C / SIGTERM in Stage 1: the loop wrote a checkpoint; say how to resume, exit 0."""
    try:
        yield
    except Stage1Stopped as stopped:
        logger.warning(
            "stopped by a signal in stage 1 at step {}; checkpoint written; resume with: {}",
            stopped.step,
            resume_command(run.dir, getattr(args, "command", None), no_progress=args.no_progress),
        )


def cmd_train(args: argparse.Namespace) -> int:
    config, accelerator, run = _setup(args)
    timings = Timings()
    resumed = args.resume is not None
    hint = resume_command(run.dir, getattr(args, "command", None), no_progress=args.no_progress)
    with _guarded(run, resumed=resumed), Session(run, timings.total, hint) as session:
        _start_tracking(args, config, run)
        with timings.section("data"), accelerator.main_process_first():  # one process
            data = load_run_data(  # generates a cached data set, the others wait
                config.data, accelerator.device, dataset=getattr(args, "dataset", None)
            )
        _record_data(run, args, data.info)
        flow_info = None
        with timings.section("stage 1"), _stage1_stop(run, args):
            field, flow_info = _flow_for(config, args, accelerator, run, data.n_items)
        if flow_info is None:  # a signal in Stage 1 (checkpoint written)
            _end(accelerator)
            return 0
        run.update_info(flow=flow_info)
        plan = args.plan
        logger.info("stage 2: {}", plan.describe())
        run.update_info(step_plan=plan.to_dict())
        stage2_started = time.monotonic()
        trainer = Stage2Trainer(
            config, field, data, run, plan, accelerator=accelerator,
            show_progress=not args.no_progress,
        )  # fmt: skip
        try:
            result = trainer.fit(
                max_steps=args.max_steps,
                max_time=args.max_time,
                # a run stopped in Stage 1 has no Stage-2 checkpoint yet: Stage 2 starts afresh
                resume=resumed and latest(run.dir / CHECKPOINTS) is not None,
            )
        finally:
            plan = _record_eager(run, plan, trainer)
        stage2_time = time.monotonic() - stage2_started
        timings.add("stage 2", stage2_time - result.validation_time)
        timings.add("validation", result.validation_time)
        if result.mechanism is None:  # stopped by a signal (checkpoint written) or not main
            if result.stop_reason == "signal" and run.main_process:
                logger.warning("resume with: {}", hint)
            _end(accelerator)
            return 0
        with timings.section("baselines"):
            report = evaluate_mechanism(
                result.mechanism,
                data.test,
                data.train_user,
                batch_size=_eval_batch(config, data.kind),
                fitted=fitted_baselines(data.train_user),
                known=data.info.get("known"),
            )
        report.update(
            run=str(run.dir),
            device=str(accelerator.device),
            device_name=_device_name(accelerator.device),
            stage2={
                "steps": result.steps,
                "best_step": result.best_step,
                "stop_reason": result.stop_reason,
                "best_val_revenue": result.best_val_revenue,
                "wall_time": result.wall_time,
            },
            step_plan=plan.to_dict(),
        )
        with timings.section("report"):
            segments = session.close("finished")
            report.update(
                wall_time=sum(seg["wall_time"] for seg in segments),
                segments=segments,
                time_breakdown=timings.as_dict(),
            )
            write_report(run, report)
        run.update_info(time_breakdown=timings.as_dict())
        # The result on stdout (`> result.txt`, pipes); the log stays on stderr.
        sys.stdout.write(format_summary(report) + "\n" + timings.format() + "\n")
        sys.stdout.flush()
    _end(accelerator)
    return 0


def _record_eager(run: Run, plan: StepPlan, trainer: Stage2Trainer) -> StepPlan:
    """The plan with what the run learned: a failed torch.compile (the step, the fused
    kernels or Adam ran eager) is a finding in run.json's ``step_plan`` and the report,
    with the fix, not only a warning in the log."""
    after = plan.after_run(trainer.parts.step, trainer.parts.optimizer)
    if after.eager is not None:
        logger.warning(eager_line({"step_plan": after.to_dict()}))
    if after != plan:
        run.update_info(step_plan=after.to_dict())
    return after


def _record_data(run: Run, args: argparse.Namespace, info: dict) -> None:
    """The run's data in run.json (and, for a --data file, its sha256 in the launch record);
    a resumed run must have the data it started with."""
    _check_same_data(run, info, resumed=args.resume is not None)
    run.update_info(data=info)
    if args.launch.get("data") and not args.launch.get("data_sha256"):
        args.launch["data_sha256"] = info.get("sha256")
        run.update_info(launch=args.launch)


def _check_same_data(run: Run, info: dict, *, resumed: bool) -> None:
    """A resumed run trains on the data it started with: the same sha256 (a regenerated
    set, or a file that changed, would silently train and report on other data)."""
    was = (run.info.get("data") or {}).get("sha256")
    now = info.get("sha256")
    if resumed and was and now and was != now:
        raise BundleflowError(
            f"--resume {run.dir}: its data were {(run.info.get('data') or {}).get('path')} "
            f"(sha256 {was[:12]}...), now {info.get('path')} has sha256 {now[:12]}...; "
            "restore those data or start a new run"
        )


def _end(accelerator) -> None:
    """Several processes: wait until every rank is done (the main one evaluates and writes
    the report after the others have finished), then leave the process group together (NCCL
    warns when it is not destroyed; a rank destroying it alone can abort the others)."""
    if accelerator.num_processes > 1:
        accelerator.wait_for_everyone()
        accelerator.end_training()
        if gloo_threads():  # issue 28: a holder of the group keeps them alive past exit
            logger.warning("process group left with Gloo threads running: {}", gloo_threads())


def cmd_train_stage2(args: argparse.Namespace) -> int:
    return cmd_train(args)  # the flow: --flow-ckpt, else the cache, else trained now


def _eval_batch(config: Config, kind: str) -> int:
    return 65536 if kind == "additive" else config.eval.batch_size


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


# --------------------------------------------------------------------------- reports


def write_report(run: Run, report: dict) -> None:
    """report.json, report.md and the plots (bundleflow.evaluation.report); the tracker's copy."""
    write_run_report(run.dir, report, main_process=run.main_process)
    if run.tracker is not None:
        step = (report.get("stage2") or {}).get("steps")
        summary = format_summary(report, table=False)
        run.tracker.log_report(summary, comparison_cells(report), report_scalars(report), step)
