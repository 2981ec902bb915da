"""Time one Stage-2 forward+backward with each integrator path, side by side in one process.

A step here: fresh noise, the menu through the flow (Q at all J·D support points), bundles,
the value oracle on a batch of XOR valuations, soft revenue, backward. Both paths run on the
same inputs; their parity is checked before timing. Usage:

    .venv/bin/python scripts/bench_core.py            # paper size: m=50 J=5000 D=8 B=128 K=6
    .venv/bin/python scripts/bench_core.py --menu 500 --repeats 3   # a quick look
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from bundleflow.flow import VelocityField
from bundleflow.menu import Menu, freeze_flow
from bundleflow.revenue import soft_revenue
from bundleflow.valuations.xor import xor_bundle_values


def synthetic_xor(n: int, k: int, m: int, gen: torch.Generator) -> torch.Tensor:
    """XOR valuations shaped like CATS ones: K atoms of equal size ≈ 1 + geometric(0.1)."""
    out = torch.zeros(n, k, m + 1)
    size = (1 + torch.distributions.Geometric(0.1).sample((n,))).clamp(max=m).long()
    scores = torch.rand(n, k, m, generator=gen)
    ranks = scores.argsort(dim=-1).argsort(dim=-1)  # a random permutation per atom
    out[..., :m] = (ranks < size[:, None, None]).float()
    out[..., m] = 100 * size[:, None].float() + 100 * torch.rand(n, k, generator=gen)
    return out


def step(menu, flow, vals, inv_temp, mix_temp, path):
    """One Stage-2 forward+backward. On CUDA the reference path runs under fp16 autocast,
    as the public code ships; everything else is float32."""
    menu.zero_grad(set_to_none=True)
    autocast = vals.device.type == "cuda" and path == "reference"
    with torch.autocast("cuda", dtype=torch.float16, enabled=autocast):
        lot = menu.lotteries(flow, mix_temp, path=path)
        loss = -soft_revenue(menu.utilities(lot, vals), menu.prices, inv_temp)
    loss.backward()
    return loss.detach()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=50)
    ap.add_argument("--menu", type=int, default=5000)
    ap.add_argument("--support", type=int, default=8)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--atoms", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    m = args.items
    device = torch.device(args.device)
    if device.type == "cuda":  # float32 means float32: no TF32 in the parity check or timing
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    flow = freeze_flow(VelocityField(m)).to(device)
    menu = Menu(m, args.menu, args.support, generator=gen).to(device)
    with torch.no_grad():
        menu.prices.mul_(700.0)  # raw CATS-like money
    vals = synthetic_xor(args.batch, args.atoms, m, gen).to(device)
    inv_temp = mix_temp = 1e-3

    # Parity on identical noise before timing.
    eps = menu.draw_noise()
    grads = {}
    for path in ("fast", "reference"):
        menu.zero_grad(set_to_none=True)
        lot = menu.lotteries(flow, mix_temp, eps=eps, path=path)
        loss = -soft_revenue(menu.utilities(lot, vals), menu.prices, inv_temp)
        loss.backward()
        grads[path] = (
            float(loss.detach()),
            lot.bundles.clone(),
            [p.grad.clone() for p in menu.parameters()],
        )
    (lf, bf, gf), (lr_, br, gr) = grads["fast"], grads["reference"]
    parity = {
        "loss_rel_diff": abs(lf - lr_) / abs(lr_),
        "bundles_differing": int((bf != br).sum()),
        "grad_max_rel_diff": max(
            float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
            for a, b in zip(gf, gr, strict=True)
        ),
    }
    if parity["loss_rel_diff"] > 1e-5 or parity["grad_max_rel_diff"] > 1e-3:
        raise SystemExit(f"parity check failed, refusing to time: {parity}")

    times = {"fast": [], "reference": []}
    for path in times:  # warm-up
        for _ in range(3 if device.type == "cuda" else 1):
            step(menu, flow, vals, inv_temp, mix_temp, path)
    sync(device)
    for _ in range(args.repeats):  # interleaved, so drift hits both paths alike
        for path in times:
            t0 = time.perf_counter()
            step(menu, flow, vals, inv_temp, mix_temp, path)
            sync(device)
            times[path].append(time.perf_counter() - t0)
    med = {p: statistics.median(t) * 1e3 for p, t in times.items()}

    # The value oracle alone on this step's J·D bundles: default (cache-sized) chunks
    # against one chunk holding the whole (B·K, J·D) inclusion matrix.
    bundles = lot.bundles.reshape(-1, m)
    whole = args.batch * args.atoms * bundles.shape[0]
    oracle = {"default_chunks": [], "single_chunk": []}
    for _ in range(args.repeats):
        for name, chunk in (("default_chunks", None), ("single_chunk", whole)):
            sync(device)
            t0 = time.perf_counter()
            xor_bundle_values(vals, bundles, chunk_elements=chunk)
            sync(device)
            oracle[name].append(time.perf_counter() - t0)
    oracle_ms = {k: round(statistics.median(v) * 1e3, 1) for k, v in oracle.items()}
    result = {
        "shape": {k: getattr(args, k) for k in ("items", "menu", "support", "batch", "atoms")},
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "repeats": args.repeats,
        "median_ms": {p: round(v, 1) for p, v in med.items()},
        "min_ms": {p: round(min(t) * 1e3, 1) for p, t in times.items()},
        "max_ms": {p: round(max(t) * 1e3, 1) for p, t in times.items()},
        "ratio_reference_over_fast": round(med["reference"] / med["fast"], 2),
        "parity": parity,
        "oracle_median_ms": oracle_ms,
        "oracle_ratio_single_over_default": round(
            oracle_ms["single_chunk"] / oracle_ms["default_chunks"], 2
        ),
        "precision": (
            "fast: float32 (TF32 off), oracle bf16 mask; reference: fp16 autocast"
            if device.type == "cuda"
            else "float32 both paths"
        ),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
