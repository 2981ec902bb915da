"""Stage-2 throughput (valuations/s) on 1..N processes: the trainer's own step.

    python scripts/bench_scaling.py --items 150 --menu 20000 --batch 1024      # 1 process
    torchrun --nproc_per_node 2 scripts/bench_scaling.py --items 150 --menu 20000 \
        --batch 1024 --parallel shard                                          # 2 GPUs

Each process runs the trainer's step (``Stage2Trainer.step`` without a run directory, as
``bundleflow.train.plan`` resolves it for that many processes: eager; every rank draws the
whole batch and ε from one seeded generator and takes its part) on a synthetic CATS-like
pool and a random flow of the preset's width; the global batch is the same for every
process count, so valuations/s = B / step time. Prints one JSON line (rank 0) with the
median step time and valuations/s.

    python scripts/bench_scaling.py --processes 1,2,4,8 --items 150 --menu 20000 --batch 1024

runs the same benchmark once per process count (``torchrun --nproc_per_node N`` for N > 1),
one after another, and prints them side by side with the speed-up over one process (the same
per-GPU step) and the efficiency; counts above the GPUs present are skipped with a line
saying so (on a machine without CUDA the processes share the CPU: a check, not a figure).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from bundleflow.maths.flow import VelocityField, default_hidden_sizes
from bundleflow.perf.bench import synthetic_xor
from bundleflow.system.distributed import Comm, before_process_group
from bundleflow.train.config import load_config, replace
from bundleflow.train.data import RunData
from bundleflow.train.plan import resolve_plan
from bundleflow.train.stage2 import Stage2Trainer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=150)
    p.add_argument("--menu", type=int, default=20000)
    p.add_argument("--support", type=int, default=8)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--atoms", type=int, default=6)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--parallel", choices=("shard", "replicate"), default="shard")
    p.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no")
    p.add_argument(
        "--processes",
        help="comma-separated process counts (e.g. 1,2,4,8): run each, print them side by side",
    )
    args = p.parse_args()
    if args.processes and "WORLD_SIZE" not in os.environ:
        sys.exit(side_by_side(args))

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if world > 1:
        before_process_group()  # issue 28: else a rank can abort on exit (SIGABRT)
        dist.init_process_group("nccl" if cuda else "gloo")
    comm = Comm(rank=rank, world=world)

    cfg = load_config(
        "default",
        {
            "data": {"n_items": args.items},
            "menu": {"size": args.menu, "support": args.support, "grand_bundle_element": False},
            "stage2": {"batch_size": args.batch, "parallel": args.parallel},
        },
    )
    gen = torch.Generator().manual_seed(0)
    pool = synthetic_xor(8192, args.atoms, args.items, gen)
    scale = float(pool[..., -1].amax(dim=1).mean())
    data = RunData(
        kind="xor", n_items=args.items, scale=scale, val=pool[:8], test=pool[:8], train_user=pool
    )
    data.train = data.normalise(pool).to(device)
    torch.manual_seed(0)
    flow = VelocityField(args.items, *default_hidden_sizes(args.items))
    cfg = replace(cfg, mixed_precision=args.mixed_precision)
    plan = resolve_plan(cfg, device, processes=world)  # the step `bundleflow train` runs
    trainer = Stage2Trainer(cfg, flow, data, plan, comm=comm)
    times = []
    for step in range(1, args.warmup + args.steps + 1):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        trainer.step()
        if cuda:
            torch.cuda.synchronize()
        if step > args.warmup:
            times.append(time.perf_counter() - t0)
    med = torch.tensor([statistics.median(times)], dtype=torch.float64, device=device)
    comm.all_reduce(med, "max")  # the slowest rank sets the pace
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    if rank == 0:
        step_ms = float(med) * 1e3
        out = {
            "processes": world,
            "parallel": trainer.shard.parallel,
            "mixed_precision": args.mixed_precision,
            "shape": {
                "items": args.items,
                "menu": args.menu,
                "support": args.support,
                "batch": args.batch,
                "atoms": args.atoms,
            },  # fmt: skip
            "median_step_ms": round(step_ms, 3),
            "valuations_per_s": round(args.batch / (step_ms / 1e3), 1),
            "peak_memory_gib_rank0": round(peak, 3) if peak is not None else None,
            "device": torch.cuda.get_device_name() if cuda else "cpu",
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
        }
        sys.stdout.write(json.dumps(out) + "\n")
    if world > 1:
        dist.destroy_process_group()


def side_by_side(args: argparse.Namespace) -> int:
    """Run the benchmark for each of ``args.processes`` and print one table (+ JSON lines)."""
    try:
        counts = [int(c) for c in args.processes.split(",") if c.strip()]
    except ValueError:
        print(f"--processes: expected comma-separated integers, got {args.processes!r}")
        return 2
    if not counts or min(counts) < 1:
        print(f"--processes: expected counts >= 1, got {args.processes!r}")
        return 2
    gpus = torch.cuda.device_count()
    passthrough, argv = [], iter(sys.argv[1:])
    for a in argv:  # every argument but --processes (one word "--processes=1,2" or two)
        if a == "--processes":
            next(argv, None)
        elif not a.startswith("--processes="):
            passthrough.append(a)
    rows = []
    for n in counts:
        if gpus and n > gpus:
            print(f"{n} processes: skipped ({gpus} GPUs here)")
            continue
        launcher = [sys.executable]
        if n > 1:
            launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]
        cmd = [*launcher, str(Path(__file__).resolve()), *passthrough]
        done = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
        if done.returncode != 0 or not lines:
            print(f"{n} processes: failed (exit {done.returncode}); its output:")
            print(f"{done.stdout.rstrip()}\n{done.stderr.rstrip()}"[-4000:])
            return 1
        rows.append(json.loads(lines[-1]))
    if not rows:
        return 1
    base = rows[0]["valuations_per_s"] if rows[0]["processes"] == 1 else None
    print(f"{'processes':>9}  {'parallel':>9}  {'step ms':>8}  {'valuations/s':>12}  "
          f"{'speed-up':>8}  {'efficiency':>10}")  # fmt: skip
    for r in rows:
        speed = r["valuations_per_s"] / base if base else None
        eff = speed / r["processes"] if speed else None
        print(f"{r['processes']:>9}  {r['parallel']:>9}  {r['median_step_ms']:>8.3f}  "
              f"{r['valuations_per_s']:>12.1f}  "
              f"{'' if speed is None else f'{speed:.2f}x':>8}  "
              f"{'' if eff is None else f'{eff:.0%}':>10}")  # fmt: skip
    device = rows[0]["device"]
    if device == "cpu":
        print("(no CUDA: the processes share this machine's CPU cores; not a scaling figure)")
    for r in rows:
        sys.stdout.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    main()
