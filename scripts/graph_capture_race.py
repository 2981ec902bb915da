"""Does the captured Stage-1 step draw what the eager step draws while other processes load
the GPU? Eager and graph steps from one seed, side by side, TRIALS times, with the wait after
capture (``settle_capture``) and without it (patched out); prints the steps whose losses differ.

    python scripts/graph_capture_race.py [--trials 8] [--steps 12] [--load 6]

--load N starts N processes that multiply 8,192² matrices on the GPU until the script ends.
Needs CUDA. What it printed: BENCHMARKS.md, issue 27's sixth pass, "A race in the CUDA-graph
steps".
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import torch

import bundleflow.train.stage1_step as stage1_step
from bundleflow.maths.flow import MixtureNoise, VelocityField
from bundleflow.train.config import FlowConfig, Stage1Config

LOAD = (
    "import torch\n"
    "a = torch.randn(8192, 8192, device='cuda')\n"
    "while True:\n"
    "    a = (a @ a).tanh_()\n"
)


def run(steps: int, mode: str) -> torch.Tensor:
    torch.manual_seed(0)
    field = VelocityField(50, 128)
    noise = MixtureNoise(50, 3, -1.0, generator=torch.Generator().manual_seed(0))
    cfg = Stage1Config(steps=steps, batch_size=2048, lr=5e-3, lr_schedule="cosine", seed=0)
    step = stage1_step.Stage1Step(field, noise, cfg, FlowConfig(), "cuda", mode=mode)
    for _ in range(steps):
        step()
    return step.history.cpu()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--load", type=int, default=6)
    args = parser.parse_args()
    loads = [subprocess.Popen([sys.executable, "-c", LOAD]) for _ in range(args.load)]
    settle = stage1_step.settle_capture
    try:
        time.sleep(5 if loads else 0)  # let them start
        for label, fn in (("without the wait", lambda device: None), ("with the wait", settle)):
            stage1_step.settle_capture = fn
            bad = 0
            for trial in range(args.trials):
                eager, graph = run(args.steps, "eager"), run(args.steps, "graph")
                differ = (~torch.isclose(graph, eager, rtol=1e-5, atol=0)).nonzero().flatten()
                bad += bool(differ.numel())
                print(f"{label}, trial {trial}: steps that differ {differ.tolist()}", flush=True)
            print(f"{label}: {bad} of {args.trials} trials differ (load: {args.load} processes)")
    finally:
        stage1_step.settle_capture = settle
        for p in loads:
            p.kill()
            p.wait()


if __name__ == "__main__":
    main()
