"""`bundleflow bench`: time the Stage-2 step, fast path against reference path."""

from __future__ import annotations

import argparse
import json
import sys

from loguru import logger


def register(sub: argparse._SubParsersAction) -> None:
    doc = "time the Stage-2 step: fast path against the reference path, parity checked first"
    p = sub.add_parser("bench", help=doc, description=doc)
    p.add_argument("--items", type=int, default=50, help="m (default 50)")
    p.add_argument("--menu", type=int, default=5000, help="J menu elements (default 5000)")
    p.add_argument("--support", type=int, default=8, help="D support points (default 8)")
    p.add_argument("--batch", type=int, default=128, help="B valuations per step (default 128)")
    p.add_argument("--atoms", type=int, default=6, help="K atoms per valuation (default 6)")
    p.add_argument("--steps", type=int, default=50, help="timed steps per path (default 50)")
    p.add_argument("--warmup", type=int, default=5, help="warm-up steps per path (default 5)")
    p.add_argument("--device", default="auto", help="auto (default), cuda, cuda:N, mps or cpu")
    p.add_argument(
        "--target-ms", type=float, help="exit 1 when the fast path's median step is above this"
    )
    p.add_argument(
        "--eval-valuations",
        type=int,
        default=1000,
        help="valuations in the hard-evaluation timing (default 1000)",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--mode",
        choices=("auto", "eager", "graph", "compile"),
        default="auto",
        help="fast-path launch mode (default auto: graph on CUDA, eager elsewhere)",
    )
    mode.add_argument("--graph", dest="mode", action="store_const", const="graph")
    mode.add_argument("--compile", dest="mode", action="store_const", const="compile")
    mode.add_argument("--eager", dest="mode", action="store_const", const="eager")
    p.add_argument(
        "--precision",
        choices=("fp32", "tf32", "bf16"),
        default=None,
        help="the fast path's flow network: fp32, tf32 (CUDA) or bf16 (held to the public "
        "code's fp16 tolerance); default: what `bundleflow train` runs here (bf16 on CUDA, "
        "fp32 elsewhere)",
    )
    p.add_argument(
        "--tf32", dest="precision", action="store_const", const="tf32", help="= --precision tf32"
    )
    p.add_argument(
        "--kernels",
        choices=("auto", "plain", "fused", "compiled"),
        default="auto",
        help="the fast path's per-point work (default auto: compiled on CUDA, plain on the "
        "CPU; as the trainer's stage2.kernels)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from bundleflow.errors import BundleflowError
    from bundleflow.perf.bench import BenchConfig, format_text, run_bench
    from bundleflow.system.devices import resolve_device

    for flag in ("items", "menu", "support", "batch", "atoms", "steps", "eval_valuations"):
        if getattr(args, flag) < 1:
            raise BundleflowError(f"--{flag.replace('_', '-')} must be ≥ 1")
    device = resolve_device(args.device).device
    if args.mode == "graph" and device.type != "cuda":
        raise BundleflowError(f"--mode graph needs CUDA; the device is {device}")
    if args.precision is None:  # the trainer's answer (bundleflow.train.plan)
        from bundleflow.train.plan import stage2_precision

        value, reason = stage2_precision(None, device)
        args.precision = "bf16" if value == "bf16" else "fp32"
        logger.info("bench: flow network {} ({}), as `bundleflow train`", args.precision, reason)
    cfg = BenchConfig(
        items=args.items,
        menu=args.menu,
        support=args.support,
        batch=args.batch,
        atoms=args.atoms,
        steps=args.steps,
        warmup=max(1, args.warmup),
        eval_valuations=args.eval_valuations,
        mode=args.mode,
        precision=args.precision,
        kernels=args.kernels,
        seed=args.seed,
    )
    report = run_bench(cfg, device)
    code = 0 if report["parity_ok"] else 1
    if args.target_ms is not None:
        fast = report["fast"]["median_ms"]
        report["target_ms"] = args.target_ms
        report["target_met"] = fast is not None and fast <= args.target_ms
        if not report["target_met"]:
            code = 1
    if args.json:
        sys.stdout.write(json.dumps(report) + "\n")
    else:
        sys.stdout.write(format_text(report) + "\n")
    return code
