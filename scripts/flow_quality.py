"""Cheap Stage-1 flow-quality proxies beside the Stage-2 revenue they should predict (issue 17).

    python scripts/flow_quality.py RUN_DIR [RUN_DIR ...]

For each finished run (its ``flow.json`` names the cached flow, its ``report.json`` the
hard test revenue of the frozen menu), pushes 8,192 menu-initialisation points
(0.05 + 0.9·sigmoid(10·N(0,1)), where Stage-2 support points start) through the flow and
prints the proxies: agreement of the bundle with rounding z0 at 0.5; mean distance of z_N
from 0.5 (how decided the end points are) and from the nearest of 0 and 1 (how far the flow
overshoots or falls short of the corners it should reach); the share of distinct bundles;
mean bundle size ÷ m; and the share of items whose inclusion flips when the start point
moves by N(0, 0.05²) (how much the flow's bundle responds to the support locations Stage 2
moves). Then the
Spearman rank correlation of each proxy with the test revenue across the runs given.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from bundleflow.maths.flow import integrate, round_bundles
from bundleflow.train.stage1 import load_flow


def proxies(field, n_points: int = 8192) -> dict[str, float]:
    """The proxies of a velocity field (see the module's docstring)."""
    m = field.n_items
    gen = torch.Generator().manual_seed(0)
    z0 = 0.05 + 0.9 * torch.sigmoid(10 * torch.randn(n_points, m, generator=gen))
    moved = (z0 + 0.05 * torch.randn(n_points, m, generator=gen)).clamp(0.0, 1.0)
    with torch.no_grad():
        zn = integrate(field, z0, 5, enable_grad=False).z_n
        zm = integrate(field, moved, 5, enable_grad=False).z_n
    b, bm = round_bundles(zn), round_bundles(zm)
    return {
        "agree_0.5": float((b == (z0 >= 0.5)).float().mean()),
        "decided": float((zn - 0.5).abs().mean()),
        "off_corner": float(torch.minimum(zn.abs(), (zn - 1).abs()).mean()),
        "distinct": len({tuple(r) for r in b.to(torch.int8).tolist()}) / n_points,
        "size/m": float(b.float().sum(-1).mean()) / m,
        "flips": float((b != bm).float().mean()),
    }


def spearman(x: list[float], y: list[float]) -> float:
    rx = torch.tensor(x).argsort().argsort().double()
    ry = torch.tensor(y).argsort().argsort().double()
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()))


def main() -> None:
    rows = []
    for run in map(Path, sys.argv[1:]):
        flow = json.loads((run / "flow.json").read_text())
        report = json.loads((run / "report.json").read_text())
        field, noise, _ = load_flow(Path(flow["path"]))
        row = {"run": str(run), "revenue": report["revenue"]["mean"], **proxies(field)}
        row["log_std"] = noise.log_std
        rows.append(row)
        print(json.dumps(row), flush=True)
    if len(rows) > 2:
        rev = [r["revenue"] for r in rows]
        for key in ("agree_0.5", "decided", "off_corner", "distinct", "size/m", "flips"):
            print(f"spearman(revenue, {key}) = {spearman(rev, [r[key] for r in rows]):+.2f}")


if __name__ == "__main__":
    main()
