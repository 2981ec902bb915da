"""Is there room above bundle-size pricing for a richer posted price? (issue 17 experiment)

    python scripts/size_item_pricing.py DATA.safetensors

Fits c(T) = e_|T| + δ·T (bundle-size prices plus one premium or discount per item) on the
first 90% of a CATS data file (the trainer's training split), starting from the fitted
bundle-size schedule, by coordinate ascent on a shrinking grid (items, then sizes, five
rounds), and prints training / validation / test revenue per round and the paired
difference to bundle-size pricing on the test split (the last 5%). A bidder buys the atom
maximising b_k − c(T_k) when that is ≥ 0, as under the baselines' rule.

On `default`'s data (CATS arbitrary-upv m=20, data seed 0) the richer schedule earns no
more than bundle-size pricing (BENCHMARKS.md, "Revenue, issue 17, second pass").
"""

from __future__ import annotations

import math
import sys

import torch

from bundleflow.evaluation import baselines
from bundleflow.valuations.io import read_valuations


def revenue(vals: torch.Tensor, delta: torch.Tensor, eff: torch.Tensor) -> torch.Tensor:
    """Payments ``[N]`` under c(T) = eff[|T|] + δ·T."""
    atoms = vals[..., :-1]
    return _pay(vals[..., -1], atoms.sum(-1), eff, (atoms * delta).sum(-1))


def _pay(values, sizes, eff, item_cost):
    """Payments ``[..., N]`` for atom values/sizes ``[N, K]`` and item costs ``[..., N, K]``."""
    values = torch.where(sizes > 0, values, -math.inf)
    cost = eff[sizes.round().long()] + item_cost
    best, k = (values - cost).max(-1)
    pay = cost.gather(-1, k[..., None]).squeeze(-1)
    return torch.where(best >= 0, pay, 0.0)


def ascend(train: torch.Tensor, val: torch.Tensor, test: torch.Tensor) -> None:
    m = train.shape[-1] - 1
    eff = baselines.effective_size_prices(baselines.fit_bundle_size_prices(train))
    base_eff, delta = eff.clone(), torch.zeros(m, dtype=torch.float64)
    scale = float(eff[torch.isfinite(eff)].max())
    atoms, values, sizes = train[..., :-1], train[..., -1], train[..., :-1].sum(-1)
    print(f"bundle-size pricing: train {float(revenue(train, delta, eff).mean()):.2f}", flush=True)
    for rnd, width in enumerate([0.2, 0.1, 0.05, 0.025, 0.0125]):
        steps = torch.arange(-20, 21, dtype=torch.float64) * (width / 20 * scale)  # exact 0
        item_cost = (atoms * delta).sum(-1)
        for i in range(m):  # a loop over items (coordinates); the 41 candidates in one batch
            grid = delta[i] + steps
            trial_cost = item_cost + (grid[:, None, None] - delta[i]) * atoms[None, ..., i]
            scores = _pay(values, sizes, eff, trial_cost).mean(-1)
            best = int(scores.argmax())
            item_cost = trial_cost[best]
            delta[i] = grid[best]
        for s in range(1, m + 1):
            if not math.isfinite(float(eff[s])):
                continue
            grid = eff[s] + steps
            scores = []
            for g in grid:
                trial = eff.clone()
                trial[s] = g
                trial = baselines.effective_size_prices(trial)
                scores.append(float(_pay(values, sizes, trial, item_cost).mean()))
            eff[s] = grid[max(range(len(scores)), key=scores.__getitem__)]
            eff = baselines.effective_size_prices(eff)
        figures = [float(revenue(x, delta, eff).mean()) for x in (train, val, test)]
        print(
            f"round {rnd}: train {figures[0]:.2f}  val {figures[1]:.2f}  test {figures[2]:.2f}",
            flush=True,
        )
    zero = torch.zeros(m, dtype=torch.float64)
    diff = revenue(test, delta, eff) - revenue(test, zero, base_eff)
    half = 1.96 * float(diff.std()) / math.sqrt(diff.numel())
    ratio = float(revenue(test, delta, eff).mean() / revenue(test, zero, base_eff).mean())
    print(f"test: ratio {ratio:.4f}; paired difference {float(diff.mean()):.2f} ± {half:.2f}")


def main() -> None:
    vals = read_valuations(sys.argv[1])[0].double()
    n = vals.shape[0]
    n_train = int(n * 0.9)
    n_val = (n - n_train) // 2
    ascend(vals[:n_train], vals[n_train : n_train + n_val], vals[n_train + n_val :])


if __name__ == "__main__":
    main()
