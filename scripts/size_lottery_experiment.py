"""Experiment: size lotteries beside fitted bundle-size pricing (issue 17, third pass).

    python scripts/size_lottery_experiment.py DATA.safetensors [--probs 0.5,0.7,0.8,0.9,0.95]

Option (k, q, p): any k items of the bidder's choice, delivered with probability q, for the
price p (paid either way): utility q·V(k) − p, V(k) the best atom of size ≤ k. Candidates
every k = 1..m with every q; prices by the exact coordinate ascent of bundleflow.maths.polish on
the file's training split beside bundle-size pricing fitted there, validation picking the
round; prints the test revenue with and without the lotteries (paired 95% CI).

    python scripts/size_lottery_experiment.py DATA.safetensors --kind choice [--names 2,3,4,5,6]

Option (k, n, p), "choice lotteries": name n distinct bundles of k items, receive one of them
uniformly at random, for p. A bidder whose atoms have size k values it at the mean of its n
best atoms (0 for the names beyond its K atoms); one with smaller atoms names supersets,
C(m−s, k−s) of them per atom (counted greedily, best atom first; supersets shared by two
atoms are not deduplicated, a slight overstatement at sizes near m); larger atoms: nothing.
Symmetric, so open to exchangeable items; it screens on how flat a bidder's substitutes are.
"""

from __future__ import annotations

import argparse
import math

import torch

from bundleflow.evaluation.baselines import effective_size_prices, fit_bundle_size_prices
from bundleflow.evaluation.evaluate import paired_ratio_ci
from bundleflow.evaluation.posted import PostedPrices
from bundleflow.maths.polish import polish_prices
from bundleflow.maths.revenue import hard_outcome
from bundleflow.valuations import io as data_io
from bundleflow.valuations.xor import atoms_and_values

NOT_SOLD = 1e12


def lottery_values(valuations: torch.Tensor, probs: list[float]) -> torch.Tensor:
    """q·V(k) ``[N, m·len(probs)]`` (k fastest), −NOT_SOLD where no atom fits."""
    atoms, values = atoms_and_values(valuations, dtype=torch.float64, padding=-math.inf)
    sizes = atoms.sum(dim=-1).round()  # (N, K)
    m = atoms.shape[-1]
    k = torch.arange(1, m + 1, dtype=sizes.dtype)
    best = torch.where(sizes[:, :, None] <= k, values[:, :, None], -math.inf).amax(dim=1)
    return torch.cat([q * best for q in probs], dim=1).clamp(min=-NOT_SOLD)


def choice_values(valuations: torch.Tensor, names: list[int]) -> torch.Tensor:
    """Mean value of the best n named size-k bundles ``[N, m·len(names)]`` (k fastest)."""
    atoms, values = atoms_and_values(valuations, dtype=torch.float64, padding=-math.inf)
    sizes = atoms.sum(dim=-1).round()  # (N, K); padding atoms have size 0, value -inf
    m = atoms.shape[-1]
    order = values.argsort(dim=1, descending=True)
    v = values.gather(1, order).clamp(min=0.0)  # (N, K), best first, padding -> 0
    s = sizes.gather(1, order)[:, :1].long()  # every atom of a bidder has one size
    supersets = [  # per k: size-k supersets of one atom of size j, for j = 0..m
        torch.tensor(
            [math.comb(m - j, k - j) if j <= k else 0 for j in range(m + 1)], dtype=torch.float64
        )
        for k in range(m + 1)
    ]
    cols = []
    for n in names:
        for k in range(1, m + 1):
            copies = supersets[k][s]  # (N, 1) supersets per atom
            taken = torch.zeros_like(v[:, 0])
            total = torch.zeros_like(v[:, 0])
            for j in range(v.shape[1]):  # a loop over the ≤ 6 atom ranks, not valuations
                take = torch.minimum(copies[:, 0], n - taken)
                total += take * v[:, j]
                taken += take
            value = total / n
            ok = (s[:, 0] <= k) & (math.comb(m, k) >= n)  # n distinct bundles must exist
            cols.append(torch.where(ok, value, -NOT_SOLD))
    return torch.stack(cols, dim=1).clamp(min=-NOT_SOLD)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data")
    ap.add_argument("--probs", default="0.5,0.7,0.8,0.9,0.95")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--kind", choices=["size", "choice"], default="size")
    ap.add_argument("--names", default="2,3,4,5,6", help="choice lotteries: n values")
    a = ap.parse_args()
    probs = [float(x) for x in a.probs.split(",")]
    names = [int(x) for x in a.names.split(",")]
    ds = data_io.load_dataset(a.data)
    train, val, test = (ds.part(name).double() for name in ("train", "val", "test"))
    posted = PostedPrices(size_prices=effective_size_prices(fit_bundle_size_prices(train)))

    def parts(v):
        if a.kind == "choice":
            return (choice_values(v, names), *posted.outcome(v))
        return (lottery_values(v, probs), *posted.outcome(v))

    tr, va, te = parts(train), parts(val), parts(test)
    start = torch.full((tr[0].shape[1],), NOT_SOLD, dtype=torch.float64)
    res = polish_prices(tr[0], start, tr[1], tr[2], rounds=a.rounds, val=va,
                        generator=torch.Generator().manual_seed(0))  # fmt: skip

    def pay(prices):
        return hard_outcome(te[0] - prices, prices, (te[1], te[2]))[1]

    before, after = pay(start), pay(res.prices)
    r = paired_ratio_ci(after, before)
    print(f"{a.data}: train {res.train_revenue[0]:.2f} -> {max(res.train_revenue):.2f}, "
          f"val {res.val_revenue[0]:.2f} -> {res.val_revenue[res.round_kept]:.2f} "
          f"(round {res.round_kept}), lotteries sold {int((res.prices < NOT_SOLD / 2).sum())}; "
          f"test {float(before.mean()):.2f} -> {float(after.mean()):.2f}: {r['ratio']:.4f} "
          f"[{r['ci95'][0]:.4f}, {r['ci95'][1]:.4f}]")  # fmt: skip


if __name__ == "__main__":
    main()
