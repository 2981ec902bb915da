"""The Stage-1 step eager vs captured in a CUDA graph: ms per step, or whole runs per seed.

    python scripts/bench_stage1.py                       # ms/step, eager and graph
    python scripts/bench_stage1.py --quality --seeds 0 1 2 [--modes plain graph]

Timing prints one JSON line per mode (m items, batch pairs, the reference's widths) and one
with the ratio and the implied time of a 30,000-step Stage 1. ``--quality`` trains the
``paper-m50`` Stage 1 (``--steps`` to shorten) once per seed and mode and prints its wall
time and first/last loss (means of the first 20 / last 100 steps); ``plain`` is the loop
``train_stage1`` ran before the step existed (pairs drawn on the CPU and copied over), the
"before" of issue 16.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bundleflow.maths.flow import MixtureNoise, VelocityField, flow_pairs, rectified_flow_loss  # noqa: E402
from bundleflow.train.config import load_config  # noqa: E402
from bundleflow.train.stage1_step import Stage1Step, time_stage1  # noqa: E402

PAPER_STEPS = 30000


def emit(record: dict) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def plain_run(field, noise, cfg, flow_cfg, device, gen) -> torch.Tensor:
    """The pre-step Stage-1 loop: CPU draws, copied to the device each step."""
    field.to(device)
    optimizer = torch.optim.Adam(field.parameters(), lr=cfg.lr)
    schedule = None
    if cfg.lr_schedule == "cosine":
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.steps)
    history = torch.empty(cfg.steps, device=device)
    for step in range(cfg.steps):
        z0, z1 = flow_pairs(noise, cfg.batch_size, target_std=flow_cfg.target_std, generator=gen)
        t = torch.rand(cfg.batch_size, 1, generator=gen)
        z0, z1, t = (x.to(device, non_blocking=True) for x in (z0, z1, t))
        loss = rectified_flow_loss(field, z0, z1, t)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if schedule is not None:
            schedule.step()
        history[step] = loss.detach()
    return history


def quality(args, device: torch.device) -> None:
    base = load_config("paper-m50")
    m, flow_cfg = base.data.n_items, base.flow
    for seed in args.seeds:
        for mode in args.modes:
            cfg = dataclasses.replace(base.stage1, seed=seed, steps=args.steps)
            gen = torch.Generator().manual_seed(seed)
            torch.manual_seed(seed)
            field = VelocityField(m, flow_cfg.hidden, flow_cfg.hidden2)
            noise = MixtureNoise(m, flow_cfg.n_components, flow_cfg.log_std, generator=gen)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            if mode == "plain":
                history = plain_run(field, noise, cfg, flow_cfg, device, gen)
            else:
                step = Stage1Step(field, noise, cfg, flow_cfg, device, mode=mode)
                for _ in range(cfg.steps):
                    step()
                history = step.history
            last = float(history[-min(100, cfg.steps) :].mean())  # synchronises
            seconds = time.perf_counter() - start
            emit({
                "mode": mode, "seed": seed, "steps": cfg.steps, "seconds": seconds,
                "loss_first": float(history[: min(20, cfg.steps)].mean()), "loss_last": last,
                "lr_schedule": cfg.lr_schedule, "device": str(device),
            })  # fmt: skip


def timing(args, device: torch.device) -> None:
    result = {}
    for mode in args.modes:
        ms = time_stage1(mode, args.steps, args.items, args.batch, device=device)
        result[mode] = ms
        emit({
            "mode": mode, "ms_per_step": ms, "items": args.items, "batch": args.batch,
            "steps": args.steps, "device": str(device), "torch": torch.__version__,
        })  # fmt: skip
    if "eager" in result and "graph" in result:
        emit({
            "eager_ms": result["eager"], "graph_ms": result["graph"],
            "speedup": result["eager"] / result["graph"],
            "graph_seconds_per_30000_steps": result["graph"] * PAPER_STEPS / 1e3,
        })  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--modes", nargs="+", default=None, help="eager graph (and plain: --quality)")
    p.add_argument("--items", type=int, default=50)
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--steps", type=int, default=None, help="timed steps / steps per run")
    p.add_argument("--quality", action="store_true", help="whole paper-m50 Stage-1 runs")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args()
    device = torch.device(args.device)
    if args.modes is None:
        args.modes = ["eager", "graph"] if device.type == "cuda" else ["eager"]
    if args.quality:
        args.steps = args.steps or PAPER_STEPS
        quality(args, device)
    else:
        args.steps = args.steps or 1000
        timing(args, device)


if __name__ == "__main__":
    main()
