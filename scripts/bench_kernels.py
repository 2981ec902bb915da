"""The fast Stage-2 step with each form of its per-point work, side by side in one process.

    python scripts/bench_kernels.py --items 500 --precision bf16 [--kernels plain fused compiled]

For each form (``stage2.kernels``: ``plain`` autograd over elementwise operations, ``fused``
pointwise functions with a hand-written backward, ``compiled`` those functions through
torch.compile) it builds the bench's step on the same initial menu, checks its parity with
the float32 reference computation (as ``bundleflow bench`` does), then times all forms
interleaved and prints one JSON line per form plus the ratio of each to ``plain``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bundleflow.perf import bench  # noqa: E402
from bundleflow.perf.profiling import environment  # noqa: E402
from bundleflow.system.timing import synchronize  # noqa: E402
from bundleflow.train.stage2_step import Stage2Step, make_optimizer  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=50)
    p.add_argument("--menu", type=int, default=5000)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--precision", choices=bench.PRECISIONS, default="fp32")
    p.add_argument("--mode", default="auto", help="auto (graph on CUDA) | eager | graph")
    p.add_argument("--kernels", nargs="+", default=["plain", "fused", "compiled"])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--time-failed", action="store_true", help="time forms that fail parity too (marked)"
    )
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg = bench.BenchConfig(
        items=args.items, menu=args.menu, batch=args.batch, precision=args.precision
    )
    flow, menu, pool, _ = bench.build(cfg, device)
    q_dtype = torch.bfloat16 if args.precision == "bf16" else None
    steps, results = {}, {}
    for kind in args.kernels:
        m = copy.deepcopy(menu)
        opt = make_optimizer(m, [{"params": list(m.parameters()), "lr": bench.LR}], args.mode)
        step = Stage2Step(
            m, flow, opt, pool, cfg.batch, mode=args.mode, tf32=args.precision == "tf32",
            q_dtype=q_dtype, warmup=3, kernels=kind,
        )  # fmt: skip
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            step(bench.INV_TEMP, bench.MIX_TEMP)
        synchronize(device)
        warm = time.perf_counter() - t0
        parity = bench.parity_step(step, m, flow, bench.TOLERANCES[args.precision], 5)
        results[kind] = {
            "kernels": kind,
            "mode": step.mode,
            "precision": step.precision,
            "warmup_s": round(warm, 3),
            "parity": parity,
            "fallback": step.fallback_reason,
            "peak_memory_gib": bench._peak_gib(device),
        }
        steps[kind] = step
    timed = [k for k in steps if results[k]["parity"]["ok"] or args.time_failed]
    times: dict[str, list[float]] = {k: [] for k in timed}
    for _ in range(args.steps):
        for kind in times:
            synchronize(device)
            t0 = time.perf_counter()
            steps[kind](bench.INV_TEMP, bench.MIX_TEMP)
            synchronize(device)
            times[kind].append(time.perf_counter() - t0)
    env = environment(device)
    base = None
    for kind, res in results.items():
        res.update(bench._stats(times[kind]) if kind in times else {"median_ms": None})
        if kind == "plain":
            base = res["median_ms"]
    for res in results.values():
        if base and res["median_ms"]:
            res["speedup_vs_plain"] = round(base / res["median_ms"], 3)
        res.update(items=args.items, menu=args.menu, batch=args.batch, device=env["device_name"])
        res["torch"] = env["torch"]
        sys.stdout.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
