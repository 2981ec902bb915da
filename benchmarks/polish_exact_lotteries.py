"""The price polish on exact lotteries (no flow): how far the start of the known-optimum recipe
goes with :func:`bundleflow.maths.polish.polish_prices` alone, with and without plateau moves.

The menu is the recipe's start: the top atoms of the training split as deterministic
elements, then even lotteries over seeded pairs of them (``menu.init_bundles=atom_pairs``),
priced at the fitted best posted price (``expected`` or ``cheapest``, ``menu.lottery_price``).
Hard revenue of the kept round on a fresh test sample; BENCHMARKS.md "Revenue: the
known-optimum suite" quotes its output.

    python benchmarks/polish_exact_lotteries.py specialists --items 20 [--rules expected,cheapest]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from bundleflow.evaluation.posted import fit_posted_prices
from bundleflow.maths.polish import hard_revenue_of, polish_prices
from bundleflow.train.stage2 import top_atoms
from bundleflow.valuations.known import make_setting
from bundleflow.valuations.oracle import bundle_values


def menu_values(valuations: torch.Tensor, bundles: torch.Tensor, alpha: torch.Tensor):
    """Element values ``[N, J]`` = Σ_d α_jd v(S_jd) for bundles ``[J, D, m]``."""
    J, D, m = bundles.shape
    flat = bundles.reshape(J * D, m)
    v = torch.cat([bundle_values(c, flat) for c in valuations.split(4096)]).double()
    return (v.view(-1, J, D) * alpha.double()).sum(-1)


def start_menu(train: torch.Tensor, size: int, support: int = 8, seed: int = 0):
    atoms = top_atoms(train, size)
    A, rest = atoms.shape[0], size - atoms.shape[0]
    gen = torch.Generator().manual_seed(seed)
    a = torch.randint(A, (rest,), generator=gen)
    b = (a + torch.randint(1, A, (rest,), generator=gen)) % A
    half = torch.arange(support) < (support + 1) // 2
    pairs = torch.where(half[None, :, None], atoms[a][:, None, :], atoms[b][:, None, :])
    single = atoms[:, None, :].expand(A, support, atoms.shape[1])
    return torch.cat([single, pairs]), torch.full((size, support), 1.0 / support)


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("setting")
    p.add_argument("--items", type=int)
    p.add_argument("--size", type=int, default=200)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--rules", default="expected")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    st = make_setting(args.setting, **({"n_items": args.items} if args.items else {}))
    gen = torch.Generator().manual_seed(args.seed)
    train, val, test = st.sample(50_000, gen), st.sample(20_000, gen), st.sample(200_000, gen)
    posted, record = fit_posted_prices(train, "best")
    say(f"{args.setting}: posted {record}, optimum {st.optimum.optimum:.6g}")
    bundles, alpha = start_menu(train, args.size)
    cost = posted.bundle_cost(bundles)  # (J, D)
    values = [menu_values(x, bundles, alpha) for x in (train, val, test)]

    def nobody(x):
        n = x.shape[0]
        return torch.full((n,), -torch.inf, dtype=torch.float64), torch.zeros(n).double()

    for rule in args.rules.split(","):
        if rule == "expected":
            start = (alpha.double() * cost).sum(-1)
        else:
            start = torch.where(alpha > 0, cost, torch.inf).amin(-1).double()
        for plateau in (False, True):
            t0 = time.time()
            result = polish_prices(
                values[0], start, *nobody(train), rounds=args.rounds,
                val=(values[1], *nobody(val)), generator=torch.Generator().manual_seed(0),
                plateau=plateau,
            )  # fmt: skip
            rev = hard_revenue_of(values[2], result.prices, *nobody(test))
            say(
                f"{rule:9s} plateau={plateau!s:5s} train {result.train_revenue[0]:.4f} -> "
                f"{max(result.train_revenue):.4f}, round {result.round_kept} kept, test {rev:.4f}"
                f" = {rev / st.optimum.optimum:.4f} of the optimum ({time.time() - t0:.0f} s)"
            )


if __name__ == "__main__":
    main()
