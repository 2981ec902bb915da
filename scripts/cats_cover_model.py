"""How close can a finite menu of bundles come to bundle-size pricing on CATS (issue 27)?

In CATS's default ``fresh`` mode every sample draws its own item map, so to a fixed menu a
bidder's atom of size s is a uniform s-subset of the m items: a bundle of size t holds it with
probability C(t, s) / C(m, s). The model: tier s of the menu is J_s uniformly random bundles of
size t_s, priced at the bundle-size price of s; a bidder's K atoms are taken as independent
(optimistic: real substitutes overlap and cover less), so tier s covers a bidder of size s'
with probability 1 − exp(−J_s·K·C(t_s, s')/C(m, s')), tiers independently, and she buys the
cheapest covering tier if she can afford it. J_s is proportional to each size's share of the
bundle-size revenue; every t_s is chosen by coordinate search. Prints the model's revenue ÷
bundle-size pricing for each J.

    python scripts/cats_cover_model.py DATA_FILE --menu-sizes 2000,100000,10000000

DATA_FILE: CATS XOR valuations (``bundleflow data generate --dist arbitrary --items 50
--n 40000 --seed 0 --out FILE``); the first ``--train`` rows fit the prices, the rest are the
bidders of the model. BENCHMARKS.md, "Revenue: the known-optimum suite", fourth pass.
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import Tensor

from bundleflow.evaluation.baselines import (
    bundle_size_outcome,
    effective_size_prices,
    fit_bundle_size_prices,
)
from bundleflow.valuations.dataset import load_dataset


def containment(m: int) -> Tensor:
    """``[t, s]``: probability that a uniform s-subset of m items lies in a fixed t-set."""
    out = torch.zeros(m + 1, m + 1, dtype=torch.float64)
    for t in range(m + 1):
        for s in range(t + 1):
            out[t, s] = math.comb(t, s) / math.comb(m, s)
    return out


class CoverModel:
    """Bidders (size, atom count, max value) against a tiered random menu."""

    def __init__(self, valuations: Tensor, size_prices: Tensor):
        m = valuations.shape[-1] - 1
        values = valuations[..., m].double()
        real = values > 0
        self.size = torch.where(real, valuations[..., :m].sum(-1), 0).amax(1).long()
        self.atoms = real.sum(1).double()
        self.value = values.amax(1)
        self.price = effective_size_prices(size_prices.double())
        self.contain = containment(m)
        self.m = m
        self.bsp = bundle_size_outcome(valuations, size_prices)[1]

    def ratio(self, counts: dict[int, float], sizes: dict[int, int]) -> float:
        """Model revenue ÷ bundle-size pricing for tiers ``counts[s]`` bundles of ``sizes[s]``."""
        revenue = torch.zeros_like(self.value)
        uncovered = torch.ones_like(self.value)  # no cheaper tier covers the bidder
        for s in sorted((s for s in counts if counts[s] > 0), key=lambda s: float(self.price[s])):
            rate = counts[s] * self.atoms * self.contain[sizes[s], self.size]
            covers = 1 - torch.exp(-rate)
            price = self.price[s]
            revenue += uncovered * covers * price * (self.value >= price)
            uncovered = uncovered * (1 - covers)
        return float(revenue.mean() / self.bsp.mean())

    def revenue_share(self) -> Tensor:
        """``[m+1]``: each atom size's bundle-size revenue from these bidders (size 0: none)."""
        share = torch.bincount(self.size, weights=self.bsp, minlength=self.m + 1)
        share[0] = 0
        return share

    def best(self, menu_size: int, passes: int = 2) -> tuple[float, dict[int, int]]:
        """The best tier sizes for ``menu_size`` bundles spread by revenue share."""
        share = self.revenue_share()
        counts = {s: float(menu_size * share[s] / share.sum()) for s in range(1, self.m + 1)}
        sizes = {s: min(self.m, s + max(1, s // 2)) for s in counts}
        now = self.ratio(counts, sizes)
        for _ in range(passes):
            for s in (s for s in counts if counts[s] > 0):
                for t in range(s, self.m + 1):
                    old, sizes[s] = sizes[s], t
                    got = self.ratio(counts, sizes)
                    if got > now:
                        now = got
                    else:
                        sizes[s] = old
        return now, sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data")
    parser.add_argument("--train", type=int, default=36000)
    parser.add_argument("--bidders", type=int, default=20000)
    parser.add_argument("--menu-sizes", default="2000,100000,10000000")
    args = parser.parse_args()
    valuations = load_dataset(args.data).valuations.double()
    prices = fit_bundle_size_prices(valuations[: args.train])
    model = CoverModel(valuations[-args.bidders :], prices)
    every = dict.fromkeys(range(1, model.m + 1), 1e30)
    exact = model.ratio(every, {s: s for s in range(model.m + 1)})
    print(f"exact atoms (t = s, unlimited bundles): {exact:.3f}")
    for size in (int(x) for x in args.menu_sizes.split(",")):
        ratio, sizes = model.best(size)
        print(f"J = {size:>10}: {ratio:.3f} of bundle-size pricing; tier sizes {sizes}", flush=True)


if __name__ == "__main__":
    main()
