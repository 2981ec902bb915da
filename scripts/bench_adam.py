"""Adam on the Stage-2 parameters, side by side: torch's fused Adam and CompiledAdam.

    python scripts/bench_adam.py [--items 50] [--menu 5000] [--support 8] [--steps 200]

Each optimizer's step over the menu's parameters (support locations [J, D, m], mixture
logits [J, D], prices [J]) is captured in a CUDA graph, as in training, and replayed; the
script prints the median time per step of each and the ratio. CUDA only.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from bundleflow.maths.adam import CompiledAdam


def time_optimizer(make, shapes, steps: int) -> float:
    params = [torch.randn(s, device="cuda", requires_grad=True) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = make(params)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up: state, compilation
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 10)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=50)
    ap.add_argument("--menu", type=int, default=5000)
    ap.add_argument("--support", type=int, default=8)
    ap.add_argument("--steps", type=int, default=200)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_adam: needs a CUDA device")
    shapes = [(a.menu, a.support, a.items), (a.menu, a.support), (a.menu,)]
    fused = time_optimizer(
        lambda ps: torch.optim.Adam(ps, lr=0.1, fused=True, capturable=True), shapes, a.steps
    )
    compiled = time_optimizer(lambda ps: CompiledAdam(ps, lr=0.1, capturable=True), shapes, a.steps)
    out = {
        "shapes": shapes,
        "torch_fused_adam_ms": fused,
        "compiled_adam_ms": compiled,
        "ratio": fused / compiled,
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
