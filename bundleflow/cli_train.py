"""`bundleflow train | train-stage1 | train-stage2` (evaluate and menu: cli_eval)."""

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

from bundleflow.config import Config, load_config, parse_set
from bundleflow.devices import resolve_device
from bundleflow.errors import BundleflowError
from bundleflow.evaluate import evaluate_mechanism
from bundleflow.fused import resolve_kernels
from bundleflow.report import format_summary, write_run_report
from bundleflow.train.data import load_run_data
from bundleflow.train.run import CONFIG_FILE, Run, open_run, runs_root
from bundleflow.train.stage1 import FLOW_FILE, get_flow, load_flow_ckpt
from bundleflow.train.stage2 import (
    BEST,
    CHECKPOINTS,
    graph_unavailable,
    stage2_precision,
    train_stage2,
)


def add_config_args(p: argparse.ArgumentParser) -> None:
    """--preset, --set, --data, --device: what every command that builds a config takes."""
    p.add_argument("--preset", default="default", help="preset name in configs/ or a YAML path")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        metavar="KEY=VALUE",
        help="override one config key (dotted, YAML value); repeatable",
    )
    p.add_argument("--data", help="a data file (ours, reference .pt/zip, CATS text)")
    p.add_argument("--device", choices=("auto", "cuda", "mps", "cpu"), help="default: auto")


def _common(p: argparse.ArgumentParser) -> None:
    add_config_args(p)
    p.add_argument("--runs-dir", help="root of run directories (default $BUNDLEFLOW_HOME/runs)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    p.add_argument("--max-steps", type=int, help="stop this stage after N steps")
    p.add_argument("--max-time", type=float, help="stop Stage 2 after this many seconds")
    p.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"))
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


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
    """Defaults < preset < --set < flags (env/.env only hold paths, never hyper-parameters)."""
    overrides = parse_set(args.overrides)
    if args.device:
        overrides["device"] = args.device
    if args.mixed_precision:
        overrides["mixed_precision"] = args.mixed_precision
    if args.resume:
        saved = Path(args.resume) / CONFIG_FILE
        if not saved.is_file():
            raise BundleflowError(f"--resume {args.resume}: no {CONFIG_FILE}; not a run directory")
        return load_config(str(saved), overrides)  # the run's own resolved config
    return load_config(args.preset, overrides)


def make_accelerator(config: Config, device: torch.device):
    from accelerate import Accelerator

    kwargs = {"cpu": device.type == "cpu"}
    if config.mixed_precision is not None:  # only when the user set it (flag > launcher)
        kwargs["mixed_precision"] = config.mixed_precision
    return Accelerator(**kwargs)


def _setup(args: argparse.Namespace):
    config = resolve_config(args)
    choice = resolve_device(config.device)
    logger.info("device: {} ({})", choice.device, choice.reason)
    accelerator = make_accelerator(config, choice.device)
    if config.stage2.step_mode == "graph":  # refuse before anything is written
        has_pool = config.data.kind != "additive" or getattr(args, "data", None) is not None
        mixed, _ = stage2_precision(config.mixed_precision, choice.device)
        reason = graph_unavailable(choice.device, has_pool, accelerator, mixed)
        if reason is not None:
            raise BundleflowError(f"config key 'stage2.step_mode': graph is unavailable: {reason}")
    resume = Path(args.resume) if args.resume else None
    if accelerator.num_processes > 1:
        logger.info(
            "process {} of {} on {}",
            accelerator.process_index,
            accelerator.num_processes,
            accelerator.device,
        )
    run = _open_shared_run(args, config, accelerator, resume)
    run.update_info(
        device=str(accelerator.device), device_reason=choice.reason, command=" ".join(sys.argv)
    )
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
    )
    if accelerator.is_main_process:
        try:
            save_flow(directory, field, noise, {"summary": summary, "key": key})
        except (FileExistsError, OSError) as err:
            logger.warning("flow not cached in {}: {}", directory, err)
    accelerator.wait_for_everyone()
    return field, {"key": key, "path": str(directory), "cached": False, **summary}


# --------------------------------------------------------------------------- commands


@contextlib.contextmanager
def _guarded(run: Run, *, resumed: bool):
    """Close the run; on a user error before anything was trained, remove the new run
    directory so no half-written run is left behind (checkpoints and flows are kept)."""
    try:
        yield
    except BundleflowError:
        run.close()
        produced = any((run.dir / name).exists() for name in (CHECKPOINTS, BEST, FLOW_FILE))
        if not resumed and run.main_process and not produced:
            shutil.rmtree(run.dir, ignore_errors=True)
        raise
    finally:
        run.close()


def cmd_train_stage1(args: argparse.Namespace) -> int:
    config, accelerator, run = _setup(args)
    with _guarded(run, resumed=args.resume is not None):
        if args.max_steps:
            from bundleflow.config import replace

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
        )
        run.write_json(FLOW_FILE, info)
        run.update_info(stage1={**info, "wall_time": time.monotonic() - started})
        logger.info("flow: {} (use it with --flow-ckpt {})", info["path"], run.dir)
    _end(accelerator)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    config, accelerator, run = _setup(args)
    started = time.monotonic()
    with _guarded(run, resumed=args.resume is not None):
        with accelerator.main_process_first():  # one process generates the cached data set
            data = load_run_data(config.data, accelerator.device, data_file=args.data)
        run.update_info(data=data.info)
        field, flow_info = _flow_for(config, args, accelerator, run, data.n_items)
        run.update_info(flow=flow_info)
        precision, source = stage2_precision(config.mixed_precision, accelerator.device)
        logger.info("stage 2: flow network precision {} ({})", precision, source)
        run.update_info(stage2_precision={"value": precision, "source": source})
        low = precision in ("bf16", "fp16")
        kernels = resolve_kernels(config.stage2.kernels, accelerator.device, low)
        if config.stage2.path == "fast":
            logger.info("stage 2: {} kernels (stage2.kernels={})", kernels, config.stage2.kernels)
        run.update_info(stage2_kernels=kernels)
        result = train_stage2(
            config,
            field,
            data,
            run,
            accelerator.device,
            accelerator=accelerator,
            max_steps=args.max_steps,
            max_time=args.max_time,
            resume=args.resume is not None,
            show_progress=not args.no_progress,
            mixed_precision=precision,
        )
        if result.mechanism is None:  # stopped by a signal (checkpoint written) or not main
            _end(accelerator)
            return 0
        report = evaluate_mechanism(
            result.mechanism, data.test, data.train_user, batch_size=_eval_batch(config, data.kind)
        )
        report.update(
            run=str(run.dir),
            device=str(accelerator.device),
            device_name=_device_name(accelerator.device),
            wall_time=time.monotonic() - started,
            stage2={
                "steps": result.steps,
                "best_step": result.best_step,
                "stop_reason": result.stop_reason,
                "best_val_revenue": result.best_val_revenue,
                "wall_time": result.wall_time,
            },
        )
        write_report(run, report)
        sys.stderr.write(format_summary(report) + "\n")
    _end(accelerator)
    return 0


def _end(accelerator) -> None:
    """Several processes: wait until every rank is done (the main one evaluates and writes
    the report after the others have finished), then leave the process group together (NCCL
    warns when it is not destroyed; a rank destroying it alone can abort the others)."""
    if accelerator.num_processes > 1:
        accelerator.wait_for_everyone()
        accelerator.end_training()


def cmd_train_stage2(args: argparse.Namespace) -> int:
    return cmd_train(args)  # the flow: --flow-ckpt, else the cache, else trained now


def _eval_batch(config: Config, kind: str) -> int:
    return 65536 if kind == "additive" else config.eval.batch_size


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


# --------------------------------------------------------------------------- reports


def write_report(run: Run, report: dict) -> None:
    """report.json, report.md and the plots (bundleflow.report)."""
    write_run_report(run.dir, report, main_process=run.main_process)
