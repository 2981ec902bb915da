"""Memory over a long Stage-2 run: host RSS and CUDA memory at checkpoints, as JSON.

Runs the trainer's own Stage-2 step (``Stage2Trainer.step`` without a run directory: eager,
or captured in a CUDA graph with ``--step graph``) on synthetic XOR valuations and a randomly
initialised flow (memory does not depend on what the flow learned), the way the loop runs it: losses
kept on the device and dropped every ``--log-every`` steps. Prints one JSON object:

    {"device": ..., "sizes": {...}, "samples": [{"step", "rss_mib", "cuda_allocated_mib",
     "cuda_reserved_mib", "python_objects", "seconds"}, ...], "growth": {...}}

``growth`` compares the last sample with the one at ``--baseline`` (default step 1,000).

    python scripts/leak_check.py --device cpu --steps 30000                   # tiny, CPU
    python scripts/leak_check.py --device cuda --steps 30000 --items 50 \\
        --menu-size 5000 --support 8 --batch 128 --step graph                 # paper size
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch


def rss_mib() -> float:
    """Resident set size of this process (Linux /proc; ru_maxrss elsewhere, a peak)."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synthetic_pool(n: int, atoms: int, items: int, seed: int) -> torch.Tensor:
    """XOR valuations ``[n, atoms, items+1]``: random bundles, every valuation one atom+."""
    g = torch.Generator().manual_seed(seed)
    bundles = (torch.rand(n, atoms, items, generator=g) < 0.3).float()
    bundles[:, 0, 0] = 1.0
    values = torch.rand(n, atoms, generator=g) * bundles.sum(-1)
    return torch.cat([bundles, values.unsqueeze(-1)], dim=-1)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=30000)
    parser.add_argument("--baseline", type=int, default=1000, help="step compared with the end")
    parser.add_argument("--sample-every", type=int, default=1000)
    parser.add_argument("--items", type=int, default=4, help="m")
    parser.add_argument("--menu-size", type=int, default=8, help="J")
    parser.add_argument("--support", type=int, default=2, help="D")
    parser.add_argument("--batch", type=int, default=8, help="B")
    parser.add_argument("--hidden", type=int, default=8, help="flow width (paper: 128)")
    parser.add_argument("--pool", type=int, default=512, help="training valuations")
    parser.add_argument("--log-every", type=int, default=200)
    parser.add_argument("--step", choices=("trainer", "graph", "eager"), default="trainer")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    from bundleflow.maths.flow import VelocityField
    from bundleflow.train.config import load_config
    from bundleflow.train.data import RunData
    from bundleflow.train.plan import resolve_plan
    from bundleflow.train.stage2 import Stage2Trainer

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = load_config(
        "default",
        {
            "data": {"n_items": args.items},
            "menu": {"size": args.menu_size, "support": args.support},
            "stage2": {
                "batch_size": args.batch,
                "steps": args.steps,
                "step_mode": "graph" if args.step == "graph" else "eager",
            },
        },
    )
    torch.manual_seed(0)
    flow = VelocityField(args.items, args.hidden, args.hidden)
    pool = synthetic_pool(args.pool, 3, args.items, seed=1)
    data = RunData(
        kind="xor",
        n_items=args.items,
        scale=1.0,
        val=pool[:64].to(device),
        test=pool[:64],
        train_user=pool,
        train=pool.to(device),
    )
    trainer = Stage2Trainer(cfg, flow, data, resolve_plan(cfg, device))  # the trainer's step
    cuda = device.type == "cuda"
    samples = []
    start = time.monotonic()

    def sample(step: int) -> None:
        gc.collect()
        if cuda:
            torch.cuda.synchronize(device)
        samples.append(
            {
                "step": step,
                "rss_mib": round(rss_mib(), 2),
                "cuda_allocated_mib": torch.cuda.memory_allocated(device) / 2**20 if cuda else None,
                "cuda_reserved_mib": torch.cuda.memory_reserved(device) / 2**20 if cuda else None,
                "python_objects": len(gc.get_objects()),
                "seconds": round(time.monotonic() - start, 2),
            }
        )

    recent: list[torch.Tensor] = []
    for step in range(1, args.steps + 1):
        recent.append(trainer.step())
        if step % args.log_every == 0:
            float(torch.stack(recent).mean())  # the loop's one host read per interval
            recent.clear()
        if step == args.baseline or step % args.sample_every == 0 or step == args.steps:
            sample(step)
    base = next((s for s in samples if s["step"] == args.baseline), samples[0])
    last = samples[-1]

    def change(key: str) -> float | None:
        if base[key] is None or not base[key]:
            return None
        return (last[key] - base[key]) / base[key]

    result = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__,
        "step_kind": args.step,
        "sizes": {
            "m": args.items,
            "J": args.menu_size,
            "D": args.support,
            "B": args.batch,
            "hidden": args.hidden,
        },
        "samples": samples,
        "growth": {
            "from_step": base["step"],
            "to_step": last["step"],
            "rss_mib": last["rss_mib"] - base["rss_mib"],
            "rss_fraction": change("rss_mib"),
            "cuda_allocated_fraction": change("cuda_allocated_mib"),
            "cuda_reserved_fraction": change("cuda_reserved_mib"),
            "python_objects": last["python_objects"] - base["python_objects"],
        },
    }
    return result


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
