"""`bundleflow compare RUN_DIR...`: finished (and unfinished) runs side by side.

Runs whose resolved configs differ only by seeds form a group; each group gets the mean and
spread of its revenues and ratios (:mod:`bundleflow.evaluation.compare`).
"""

from __future__ import annotations

import argparse
import sys

from bundleflow.errors import BundleflowError
from bundleflow.evaluation.compare import compare
from bundleflow.evaluation.run_groups import RunLayout
from bundleflow.train.config import Config, to_flat_dict


def register(sub: argparse._SubParsersAction) -> None:
    doc = "put runs side by side: settings, seeds, test revenue, ratio to the best baseline"
    p = sub.add_parser(
        "compare",
        help=doc,
        description=doc + "; runs whose configs differ only by seeds form a group with the "
        "mean, min-max and standard deviation of its revenues and ratios. Reads run.json, "
        "config.yaml and report.json; recomputes nothing.",
    )
    p.add_argument(
        "runs",
        nargs="+",
        metavar="RUN_DIR",
        help="run directories or glob patterns (quoted or not), e.g. 'runs/default-*'",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--csv", metavar="FILE", help="write one CSV row per run to FILE ('-': stdout)")
    p.add_argument("--plot", metavar="FILE.png", help="write test revenue against wall time")
    p.set_defaults(func=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> int:
    if args.json and args.csv == "-":
        raise BundleflowError("--json and --csv - both print on stdout; give one of them")
    layout = RunLayout(to_flat_dict(Config()))
    text = compare(args.runs, layout, as_json=args.json, csv_file=args.csv, plot_file=args.plot)
    sys.stdout.write(text)
    return 0
