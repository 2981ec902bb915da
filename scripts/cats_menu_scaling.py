"""Real finite menus against bundle-size pricing on CATS, as the menu grows (issue 27).

``scripts/cats_cover_model.py`` models random covers; this plays real menus on real held-out
bidders. Two designs, both built from the training bidders and priced at the effective
bundle-size price of the atom size s each element is for:

- ``unions``: each element is the union of ``--union`` training atoms of one size s, the sizes
  drawn in proportion to each size's share of the bundle-size revenue on training (the best
  hand-built design measured at J ≤ 8,000);
- ``tiers``: the cover model's best design for J, fitted on the training bidders, drawn for
  real: tier s holds J_s uniformly random bundles of the model's size t_s (``--designs FILE``
  keeps the searched designs, which take 1–2 minutes a J on a CPU).

Held-out bidders pick their best element (hard rule: the highest utility, ties to the lowest
index, buy iff ≥ 0) and pay its price. Values are computed in chunks of elements, so J can
reach 10⁷ on a GPU. By default no price is tuned; ``--polish-rounds R`` polishes them on the
training bidders first (it holds their ``[N, J]`` values, so J ≤ a few 10⁴).

    python scripts/cats_menu_scaling.py DATA_FILE --design tiers --menu-sizes 2000,100000

DATA_FILE: CATS XOR valuations (``bundleflow data generate --dist arbitrary --items 50
--n 40000 --seed 0 --out FILE``); the first ``--train`` rows fit the prices and give the
atoms, the last ``--bidders`` rows are scored. Prints J, the menu's revenue ÷ bundle-size
pricing on the same bidders with its paired 95% CI, and the share of bidders who buy.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from cats_cover_model import CoverModel  # the sibling script (run from scripts/ or its path)
from torch import Tensor

from bundleflow.evaluation.baselines import (
    bundle_size_outcome,
    effective_size_prices,
    fit_bundle_size_prices,
)
from bundleflow.evaluation.evaluate import paired_ratio_ci
from bundleflow.maths.polish import polish_prices
from bundleflow.valuations.dataset import load_dataset
from bundleflow.valuations.xor import atoms_and_values, xor_bundle_values


def atoms_by_size(train: Tensor) -> dict[int, Tensor]:
    """The training atoms ``[A_s, m]`` (0/1, float32) of each size s."""
    atoms, values = atoms_and_values(train)
    flat = atoms.reshape(-1, atoms.shape[-1])[values.reshape(-1) > 0]
    sizes = flat.sum(-1).long()
    return {int(s): flat[sizes == s].float() for s in sizes.unique()}


def union_menu(
    pool: dict[int, Tensor], share: Tensor, size: int, union: int, gen: torch.Generator
) -> tuple[Tensor, Tensor]:
    """``size`` bundles ``[J, m]`` and their atom sizes ``[J]``: unions of ``union`` random
    training atoms of one size, the sizes drawn in proportion to ``share``."""
    sizes = torch.multinomial(share, size, replacement=True, generator=gen)
    bundles = torch.zeros(size, next(iter(pool.values())).shape[1])
    for s in sizes.unique().tolist():
        rows = (sizes == s).nonzero().squeeze(1)
        atoms = pool[s]
        pick = torch.randint(atoms.shape[0], (rows.numel(), union), generator=gen)
        bundles[rows] = atoms[pick].amax(dim=1)
    return bundles, sizes


def tier_menu(
    model: CoverModel, size: int, sizes: dict[int, int], gen: torch.Generator
) -> tuple[Tensor, Tensor]:
    """The cover model's tiered design for ``size`` bundles, tier sizes ``sizes`` (``t_s``,
    from :meth:`CoverModel.best`), drawn for real: tier s holds ``J_s`` uniformly random
    bundles of size ``t_s``, J_s by the model's revenue shares. Returns the bundles ``[J, m]``
    and their tiers ``[J]``."""
    share = model.revenue_share()
    counts = (size * share / share.sum()).round().long()
    bundles, tiers = [], []
    for s in (s for s in range(1, model.m + 1) if counts[s] > 0):
        n = int(counts[s])
        order = torch.rand(n, model.m, generator=gen).argsort(dim=1)[:, : sizes[s]]
        rows = torch.zeros(n, model.m).scatter_(1, order, 1.0)
        bundles.append(rows)
        tiers.append(torch.full((n,), s, dtype=torch.long))
    return torch.cat(bundles), torch.cat(tiers)


def play(bidders: Tensor, bundles: Tensor, prices: Tensor, chunk: int) -> Tensor:
    """Payments ``[N]`` of the hard rule over a menu too large to hold its ``[N, J]``
    values: the running best utility per bidder, the earlier element kept on a tie.
    Runs on ``bidders``' device; ``bundles`` and ``prices`` move there a chunk at a time."""
    device = bidders.device
    best_u = torch.zeros(bidders.shape[0], dtype=torch.float64, device=device)  # walk away: 0
    pay = torch.zeros_like(best_u)
    bought = torch.zeros(bidders.shape[0], dtype=torch.bool, device=device)
    for start in range(0, bundles.shape[0], chunk):
        part = bundles[start : start + chunk].to(device)
        price = prices[start : start + chunk].to(device)
        # float32 inclusion everywhere: CUDA's default bf16 is exact for 0/1 sums ≤ 256 too
        values = xor_bundle_values(bidders, part, inclusion_dtype=torch.float32).double()
        u = values - price[None, :]
        top, idx = u.max(dim=1)  # max returns the first maximal index
        better = (top > best_u) | (~bought & (top >= best_u))
        best_u = torch.where(better, top, best_u)
        pay = torch.where(better, price[idx], pay)
        bought |= better
    return pay


def polished(train: Tensor, bundles: Tensor, prices: Tensor, rounds: int, chunk: int) -> Tensor:
    """The prices after ``rounds`` of the exact hard-revenue polish on the training bidders
    (:func:`bundleflow.maths.polish.polish_prices`, no fallback; holds ``[N, J]`` values)."""
    device = train.device
    values = torch.cat(
        [
            xor_bundle_values(
                train, bundles[i : i + chunk].to(device), inclusion_dtype=torch.float32
            )
            for i in range(0, bundles.shape[0], chunk)
        ],
        dim=1,
    )
    none = torch.full((train.shape[0],), -torch.inf, device=device)
    result = polish_prices(
        values,
        prices.to(device),
        none,
        torch.zeros_like(none),
        rounds=rounds,
        generator=torch.Generator().manual_seed(0),
        plateau=True,
    )
    return result.prices.cpu()


def _read_designs(path: str | None) -> dict:
    return json.loads(Path(path).read_text()) if path and Path(path).exists() else {}


def _write_designs(path: str | None, designs: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(designs, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data")
    parser.add_argument("--train", type=int, default=20000)
    parser.add_argument("--bidders", type=int, default=20000)
    parser.add_argument("--menu-sizes", default="1000,10000,100000")
    parser.add_argument("--union", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--designs",
        help="JSON file of tier designs by J: read those it has, add those it lacks",
    )
    parser.add_argument(
        "--polish-rounds",
        type=int,
        default=0,
        help="also polish the prices on the training bidders (holds [N, J] values)",
    )
    parser.add_argument(
        "--design",
        choices=("unions", "tiers"),
        default="unions",
        help="unions of training atoms, or the cover model's tiers (fitted on training)",
    )
    args = parser.parse_args()
    valuations = load_dataset(args.data).valuations
    train, bidders = valuations[: args.train], valuations[-args.bidders :]
    size_prices = fit_bundle_size_prices(train)
    effective = effective_size_prices(size_prices)
    bsp = bundle_size_outcome(bidders, size_prices)[1]
    model = CoverModel(train, size_prices)  # the training bidders' sizes and revenue shares
    pool = atoms_by_size(train)
    share = model.revenue_share()
    share[[s for s in range(share.numel()) if s not in pool]] = 0
    designs = _read_designs(args.designs)
    print(f"bundle-size pricing on {bidders.shape[0]} bidders: {float(bsp.mean()):.2f}")
    for size in (int(x) for x in args.menu_sizes.split(",")):
        start = time.time()
        gen = torch.Generator().manual_seed(args.seed)
        note = ""
        if args.design == "tiers":
            if str(size) not in designs:  # the slow part: 1-2 minutes a J on a CPU
                predicted, tiers = model.best(size)
                designs[str(size)] = {"predicted": predicted, "sizes": tiers}
                _write_designs(args.designs, designs)
            design = designs[str(size)]
            sizes_of = {int(s): t for s, t in design["sizes"].items()}
            bundles, sizes = tier_menu(model, size, sizes_of, gen)
            note = f", the model predicted {design['predicted']:.3f} on training"
        else:
            bundles, sizes = union_menu(pool, share.float(), size, args.union, gen)
        prices = effective[sizes].double()
        if args.polish_rounds > 0:
            prices = polished(
                train.to(args.device), bundles, prices, args.polish_rounds, args.chunk
            )
            note += f", prices polished ({args.polish_rounds} rounds)"
        pay = play(bidders.to(args.device), bundles, prices, args.chunk)
        ratio = paired_ratio_ci(pay.cpu(), bsp)
        r, (lo, hi) = ratio["ratio"], ratio["ci95"]
        buy = float((pay > 0).double().mean())
        print(
            f"J = {size:>9}: {r:.4f} [{lo:.4f}, {hi:.4f}] of bundle-size pricing, "
            f"{buy:.3f} buy ({time.time() - start:.0f} s{note})",
            flush=True,
        )


if __name__ == "__main__":
    main()
