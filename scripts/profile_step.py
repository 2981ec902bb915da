"""The CUDA kernels of one fast Stage-2 step, by total time (what is left to optimise).

    python scripts/profile_step.py --items 500 --precision bf16 [--mode eager] [--kernels compiled]

Runs the bench's step (``bundleflow.perf.bench``) for a few warm-up steps, then 10 steps under
``torch.profiler`` and prints the top kernels (eager mode, so each op is visible).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bundleflow.perf import bench  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=50)
    p.add_argument("--menu", type=int, default=5000)
    p.add_argument("--precision", choices=bench.PRECISIONS, default="fp32")
    p.add_argument("--mode", default="eager")
    p.add_argument("--kernels", default="plain", help="plain | fused | compiled (stage2.kernels)")
    p.add_argument("--rows", type=int, default=25)
    args = p.parse_args()
    cfg = bench.BenchConfig(
        items=args.items,
        menu=args.menu,
        precision=args.precision,
        mode=args.mode,
        kernels=args.kernels,
    )
    device = torch.device("cuda")
    flow, menu, pool, _ = bench.build(cfg, device)
    step = bench.make_steps(cfg, flow, menu, pool)["fast"][0]
    for _ in range(5):
        step(bench.INV_TEMP, bench.MIX_TEMP)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            step(bench.INV_TEMP, bench.MIX_TEMP)
        torch.cuda.synchronize()
    try:  # the key's name changed in torch 2.4 (cuda_ -> device_)
        table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=args.rows)
    except (AttributeError, KeyError, ValueError):
        table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=args.rows)
    sys.stdout.write(table + "\n")


if __name__ == "__main__":
    main()
