"""Posted-price baseline fits before and after issue 27, side by side on the same data.

    python scripts/bench_baselines.py [--threads 2] [--full]

Cases (synthetic, generated here): "specialists" (m=100, K=100: w.p. ½ every singleton is
worth 1, else one uniform item is worth 1.9) and "two-item" (m=2, K=3: atoms {1}, {2},
{1,2}, additive U[4,16] × U[4,7]). The old fits (``tests/baselines_reference.py``: every
candidate over every bidder and atom) take minutes at these sizes on a 2-core CPU, so each
case is timed old vs new at a size the old path finishes, and ``--full`` adds the new fit at
the issue's sizes (N = 40,000 specialists, 2·10⁶ two-item samples) alone.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch

from bundleflow.evaluation.baselines import fit_baselines
from bundleflow.valuations import known


def _load_reference():
    """tests/baselines_reference.py, the fits before issue 27, loaded from its file."""
    path = Path(__file__).resolve().parents[1] / "tests" / "baselines_reference.py"
    spec = importlib.util.spec_from_file_location("baselines_reference", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


reference = _load_reference()


def specialists(n: int, m: int = 100, seed: int = 0) -> torch.Tensor:
    """The suite's specialists + flexible valuations ``[n, m, m+1]``."""
    return known.specialists(n, torch.Generator().manual_seed(seed), n_items=m)


def two_item(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    v = torch.rand(n, 2, generator=g) * torch.tensor([12.0, 3.0]) + 4.0
    out = torch.zeros(n, 3, 3)
    out[:, 0, 0], out[:, 1, 1], out[:, 2, :2] = 1.0, 1.0, 1.0
    out[:, 0, 2], out[:, 1, 2], out[:, 2, 2] = v[:, 0], v[:, 1], v.sum(dim=1)
    return out


def old_fit(train: torch.Tensor) -> reference.FittedBaselines:
    uniform = reference.fit_uniform_item_price(train)
    return reference.FittedBaselines(
        grand_bundle_price=reference.fit_grand_bundle_price(train),
        uniform_price=uniform,
        item_prices=reference.fit_item_prices(train, start=uniform),
        size_prices=reference.fit_bundle_size_prices(train),
    )


def timed(fit, train):
    start = time.perf_counter()
    out = fit(train)
    return out, time.perf_counter() - start


def same(a, b) -> bool:
    close = lambda x, y: torch.allclose(x, y, rtol=1e-12, atol=0)  # noqa: E731
    return (
        a.grand_bundle_price == b.grand_bundle_price
        and abs(a.uniform_price - b.uniform_price) <= 1e-12 * abs(b.uniform_price)
        and close(a.item_prices, b.item_prices)
        and close(a.size_prices, b.size_prices)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--full", action="store_true", help="also the new fit at issue size")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [
        ("specialists m=100 K=100", specialists, 2_000),
        ("two-item m=2 K=3", two_item, 200_000),
    ]
    print(f"{'case':26} {'N':>9} {'old s':>8} {'new s':>7} {'old/new':>8}  same prices")
    for name, make, n in rows:
        train = make(n)
        new, t_new = timed(fit_baselines, train)
        old, t_old = timed(old_fit, train)
        print(f"{name:26} {n:>9,} {t_old:8.1f} {t_new:7.2f} {t_old / t_new:8.0f}  {same(new, old)}")
    if args.full:
        for name, make, n in (rows[0][:2] + (40_000,), rows[1][:2] + (2_000_000,)):
            _, t_new = timed(fit_baselines, make(n))
            print(f"{name:26} {n:>9,} {'-':>8} {t_new:7.2f} {'-':>8}  (old not run)")


if __name__ == "__main__":
    main()
