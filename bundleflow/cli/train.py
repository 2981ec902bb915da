"""``bundleflow train | train-stage1 | train-stage2``: parse, hand the launch to the
pipeline (:mod:`bundleflow.train.pipeline`), print its result on stdout."""

from __future__ import annotations

import argparse
import sys

from bundleflow.cli.options import add_run_args, launch_from
from bundleflow.train import pipeline


def register(sub: argparse._SubParsersAction) -> None:
    for name, func, doc in (
        ("train", cmd_train, "train Stage 1 (or take the cached flow), Stage 2, and evaluate"),
        ("train-stage1", cmd_train_stage1, "train (or fetch from the cache) the Stage-1 flow"),
        ("train-stage2", cmd_train, "train the menu with a given or cached flow"),
    ):
        p = sub.add_parser(name, help=doc, description=doc)
        add_run_args(p)
        if name == "train-stage2":
            p.add_argument("--flow-ckpt", help="flow checkpoint dir, run dir, or reference .pth")
        p.set_defaults(func=func)


def cmd_train(args: argparse.Namespace) -> int:
    """``train`` and ``train-stage2`` (the flow: --flow-ckpt, else the cache, else trained)."""
    result = pipeline.train(launch_from(args, " ".join(sys.argv)))
    if result is not None:  # the result on stdout (`> result.txt`, pipes); the log on stderr
        sys.stdout.write(result + "\n")
        sys.stdout.flush()
    return 0


def cmd_train_stage1(args: argparse.Namespace) -> int:
    pipeline.train_stage1(launch_from(args, " ".join(sys.argv)))
    return 0
