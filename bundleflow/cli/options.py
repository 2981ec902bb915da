"""Flags that several commands share: what builds a config (``train*``, ``config``,
``doctor``/``profile``) and how a training command runs."""

from __future__ import annotations

import argparse

from bundleflow.system.tracking import REPORT_TO
from bundleflow.train.launch import DEFAULT_PRESET, Launch


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


def add_run_args(p: argparse.ArgumentParser) -> None:
    """The flags of ``train``, ``train-stage1`` and ``train-stage2``."""
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


def launch_from(args: argparse.Namespace, argv: str) -> Launch:
    """The parsed flags as a :class:`~bundleflow.train.launch.Launch` (read once, here)."""
    return Launch(
        command=getattr(args, "command", None) or "train",
        preset=args.preset,
        overrides=tuple(args.overrides or ()),
        data=args.data,
        device=args.device,
        mixed_precision=args.mixed_precision,
        max_steps=args.max_steps,
        max_time=args.max_time,
        flow_ckpt=getattr(args, "flow_ckpt", None),
        report_to=args.report_to,
        resume=args.resume,
        runs_dir=args.runs_dir,
        no_progress=args.no_progress,
        argv=argv,
    )
