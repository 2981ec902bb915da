"""`bundleflow doctor` and `bundleflow profile`."""

from __future__ import annotations

import argparse
import json
import sys

from bundleflow.cli_train import add_config_args


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
    from bundleflow import doctor

    facts = doctor.gather()
    checks = doctor.run_checks(facts, expect_gpu=args.expect_gpu)
    if facts.launcher.process_index == 0:  # under a launcher, one report
        if args.json:
            payload = doctor.to_json(checks, facts, args.expect_gpu)
            sys.stdout.write(json.dumps(payload) + "\n")
        else:
            sys.stdout.write(doctor.format_report(checks) + "\n")
    return doctor.exit_code(checks)


def cmd_profile(args: argparse.Namespace) -> int:
    from bundleflow.profiling import profile_command

    return profile_command(args)
