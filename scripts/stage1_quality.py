"""Stage-1 flow quality without Stage 2: final loss and agreement with rounding at 0.5.

    python scripts/stage1_quality.py constant        # the reference's constant lr
    python scripts/stage1_quality.py cosine          # stage1.lr_schedule=cosine

Trains the ``paper-m50`` Stage-1 flow (30,000 steps, batch 2,048; ``--steps`` to change)
on the CPU and prints one JSON line: the training summary (first/last loss) and the share
of coordinates where the flow's bundle equals 1[z0 ≥ 0.5] on U[0.05, 0.95] points, on
menu-initialisation points (0.05 + 0.9·sigmoid(10·N(0,1))) and on Stage-1 inputs — the
proxies the spec quotes for the paper's released flow (97.3%, 98.9%, 99.1%).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bundleflow.maths.flow import integrate, round_bundles  # noqa: E402
from bundleflow.train.config import load_config  # noqa: E402
from bundleflow.train.stage1 import train_stage1  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("schedule", choices=("constant", "cosine"))
    p.add_argument("--steps", type=int, default=30000)
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = load_config("paper-m50", {"stage1": {"lr_schedule": args.schedule, "steps": args.steps}})
    start = time.time()
    field, noise, summary = train_stage1(
        50, cfg.flow, cfg.stage1, torch.device("cpu"), show_progress=False
    )
    gen = torch.Generator().manual_seed(7)
    out = {"schedule": args.schedule, "summary": summary, "seconds": time.time() - start}
    points = {
        "U[0.05,0.95]": 0.05 + 0.9 * torch.rand(20000, 50, generator=gen),
        "menu init": 0.05 + 0.9 * torch.sigmoid(10 * torch.randn(20000, 50, generator=gen)),
        "stage-1 inputs": noise.sample(20000, generator=gen),
    }
    with torch.no_grad():
        for name, z0 in points.items():
            bundles = round_bundles(integrate(field, z0, 5, enable_grad=False).z_n)
            out[name] = float((bundles == (z0 >= 0.5)).float().mean())
    sys.stdout.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
