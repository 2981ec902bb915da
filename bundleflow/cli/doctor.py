"""`bundleflow doctor` and `bundleflow profile`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from loguru import logger

from bundleflow.cli.options import add_config_args


def register(sub: argparse._SubParsersAction) -> None:
    doc = "check why a GPU is (not) used: one line per check with its fix"
    p = sub.add_parser("doctor", help=doc, description=doc)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument(
        "--expect-gpu",
        action="store_true",
        help="no usable GPU is a failure (exit 1); compose's doctor service passes it",
    )
    p.set_defaults(func=cmd_doctor)

    doc = "time Stage-2 (and Stage-1) steps under torch.profiler: trace, top operators, memory"
    p = sub.add_parser("profile", help=doc, description=doc)
    add_config_args(p)
    p.add_argument("--steps", type=int, default=20, help="profiled Stage-2 steps (default 20)")
    p.add_argument("--warmup", type=int, default=5, help="unprofiled warm-up steps (default 5)")
    p.add_argument(
        "--stage1-steps",
        type=int,
        default=0,
        help="also profile N Stage-1 steps; their flow is the one Stage 2 uses "
        "(default 0: a randomly initialised flow)",
    )
    p.add_argument("--top", type=int, default=25, help="operators per table (default 25)")
    p.add_argument("--out", help="output directory (default $BUNDLEFLOW_HOME/runs/profile-TIME)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    p.set_defaults(func=cmd_profile)


def cmd_doctor(args: argparse.Namespace) -> int:
    from bundleflow.system import doctor
    from bundleflow.system.doctor_checks import exit_code, format_report, run_checks, to_json

    facts = doctor.gather()
    checks = run_checks(facts, expect_gpu=args.expect_gpu)
    if facts.launcher.process_index == 0:  # under a launcher, one report
        if args.json:
            payload = to_json(checks, facts, args.expect_gpu)
            sys.stdout.write(json.dumps(payload) + "\n")
        else:
            sys.stdout.write(format_report(checks) + "\n")
    return exit_code(checks)


def cmd_profile(args: argparse.Namespace) -> int:
    """`bundleflow profile`: resolve config and device, run, write, print the summary."""
    from bundleflow.errors import BundleflowError
    from bundleflow.paths import runs_root
    from bundleflow.perf.profiling import (
        REPORT_JSON,
        REPORT_MD,
        TRACE,
        format_markdown,
        run_profile,
    )
    from bundleflow.system.devices import resolve_device
    from bundleflow.train.config import load_config, parse_set

    for flag in ("steps", "warmup", "stage1_steps", "top"):
        value = getattr(args, flag)
        if value < (1 if flag in ("steps", "top") else 0):
            raise BundleflowError(f"--{flag.replace('_', '-')} {value}: must be positive")
    overrides = parse_set(args.overrides)
    if args.device:
        overrides["device"] = args.device
    cfg = load_config(args.preset or "default", overrides)
    choice = resolve_device(cfg.device)
    logger.info("device: {} ({})", choice.device, choice.reason)
    out = Path(args.out) if args.out else runs_root() / f"profile-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise BundleflowError(f"--out {out}: cannot create it ({err.strerror})") from err
    report = run_profile(
        cfg,
        choice.device,
        out,
        steps=args.steps,
        warmup=args.warmup,
        stage1_steps=args.stage1_steps,
        top_n=args.top,
        data_file=args.data,
    )
    logger.info("profile written to {} ({}, {}, {})", out, REPORT_MD, REPORT_JSON, TRACE)
    if args.json:
        summary = {
            "out": str(out),
            "environment": report["environment"],
            "stages": {
                name: {k: s[k] for k in ("timing", "peak_memory", "gpu_utilization")}
                for name, s in report["stages"].items()
            },
        }
        sys.stdout.write(json.dumps(summary, default=str) + "\n")
    else:
        sys.stdout.write(format_markdown(report))
    return 0
