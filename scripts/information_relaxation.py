"""How much would a seller gain by knowing more than the bidder's atom size? (issue 17)

    python scripts/information_relaxation.py DATA.safetensors [--bins 4]

Under CATS every atom of a bidder has one size s, and under bundle-size pricing a bidder
behaves as a single-parameter buyer with value V = max_k b_k for "a bundle of size s".
If the seller also knew the rest of the bidder's type up to the scale V — the atoms and
the value profile r = b / V — the buyer would be single-parameter (value V·w(L) for a
lottery L, w ≤ 1) and, by Myerson, the optimum would be a posted price on V given (s, r):
an upper bound on any mechanism's revenue. This script estimates how far such
information moves the posted price: it fits a monopoly price on V per cell of (s, K, the
second-best ratio r₂ in quantile bins) on the training split, and scores it on the test
split (prices of cells too small to fit, < 30 training bidders, fall back to the size's),
beside per-size prices fitted the same way (every size). Cells are coarser than (s, r), so
this is an estimate of the relaxation's gain, not a bound; a gain near zero says V carries little
dependence on the substitutes' profile, and with it that screening on the profile (what a
lottery could add beside posted prices) has little to work with.
"""

from __future__ import annotations

import argparse
import math

import torch

from bundleflow.evaluation.baselines import (
    _single_price as monopoly,  # the closed-form posted price
)
from bundleflow.evaluation.baselines import bundle_size_outcome, fit_bundle_size_prices
from bundleflow.evaluation.evaluate import paired_ratio_ci
from bundleflow.valuations import io as data_io
from bundleflow.valuations.xor import atoms_and_values

MIN_CELL = 30


def features(valuations: torch.Tensor, bins: torch.Tensor | None, n_bins: int):
    """(V, s, K, r₂-bin, bin edges) per bidder."""
    atoms, values = atoms_and_values(valuations, dtype=torch.float64, padding=-math.inf)
    top = values.sort(dim=1, descending=True).values
    v = top[:, 0]
    s = atoms.sum(dim=-1).round().long()[:, 0]
    k = torch.isfinite(values).sum(dim=1)
    r2 = torch.where(k > 1, top[:, 1] / v, torch.zeros_like(v)).clamp(min=0.0)
    if bins is None:
        bins = torch.quantile(r2[k > 1], torch.linspace(0, 1, n_bins + 1, dtype=r2.dtype)[1:-1])
    return v, s, k, torch.bucketize(r2, bins), bins


def fit(keys: torch.Tensor, v: torch.Tensor, min_cell: int = MIN_CELL) -> dict[int, float]:
    """The monopoly price on V per key with at least ``min_cell`` training bidders."""
    return {int(c): monopoly(v[keys == c]) for c in keys.unique() if (keys == c).sum() >= min_cell}


def _lookup(keys: torch.Tensor, table: dict[int, float]) -> torch.Tensor:
    """``table[key]`` per entry of ``keys`` (inf where absent)."""
    if not table:
        return torch.full(keys.shape, math.inf, dtype=torch.float64)
    known = torch.tensor(sorted(table), dtype=keys.dtype)
    prices = torch.tensor([table[int(x)] for x in known], dtype=torch.float64)
    keys = keys.contiguous()
    at = torch.searchsorted(known, keys).clamp(max=len(known) - 1)
    return torch.where(known[at] == keys, prices[at], math.inf)


def pay(keys, size_keys, v, cell_prices, size_prices):
    """Payments: the cell's price, else the size's (inf: never sold); a buyer pays if V ≥ it."""
    cell = _lookup(keys, cell_prices)
    price = torch.where(torch.isfinite(cell), cell, _lookup(size_keys, size_prices))
    return torch.where(v >= price, price, 0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data")
    ap.add_argument("--bins", type=int, default=4)
    a = ap.parse_args()
    ds = data_io.load_dataset(a.data)
    train, test = ds.part("train"), ds.part("test")
    v, s, k, b, edges = features(train, None, a.bins)
    tv, ts, tk, tb, _ = features(test, edges, a.bins)
    size_prices = fit(s, v, min_cell=1)  # every size, as bundle-size pricing prices them
    base = pay(ts, ts, tv, size_prices, size_prices)
    fitted = bundle_size_outcome(train, fit_bundle_size_prices(train))[1].double().mean()
    print(
        f"{a.data}: training revenue of per-size posted prices on V without the 'may buy a "
        f"bigger bundle' coupling {float(pay(s, s, v, size_prices, size_prices).mean()):.2f}, "
        f"of fitted bundle-size pricing {float(fitted):.2f}"
    )
    print(f"  per-size posted price on V, test {float(base.mean()):.2f}")
    for name, key, tkey in (
        ("size, K", s * 10 + k, ts * 10 + tk),
        ("size, K, r2 bin", (s * 10 + k) * 100 + b, (ts * 10 + tk) * 100 + tb),
    ):
        cells = fit(key, v)
        p = pay(tkey, ts, tv, cells, size_prices)
        r = paired_ratio_ci(p, base)
        train_gain = float(pay(key, s, v, cells, size_prices).mean()) / float(
            pay(s, s, v, size_prices, size_prices).mean()
        )
        lo, hi = r["ci95"]
        print(
            f"  knowing {name}: {len(cells)} cells; train x{train_gain:.4f}; "
            f"test {float(p.mean()):.2f} = x{r['ratio']:.4f} [{lo:.4f}, {hi:.4f}]"
        )


if __name__ == "__main__":
    main()
