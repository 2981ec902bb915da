"""`bundleflow doctor`."""

from __future__ import annotations

import argparse
import json
import sys


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
