"""Experiment: price polish (bundleflow.maths.polish) on a finished run's frozen mechanism.

    python scripts/polish_experiment.py RUN_DIR [--data FILE] [--rounds 3]
        [--min-buyers 1 30 ...] [--seed 0] [--device cpu|cuda] [--json OUT]

Polishes the prices on the training split (the run's data, or --data FILE's split, same
distribution), lets validation pick the round, and prints the test revenue before and after
with the ratio to bundle-size pricing fitted on that training split (paired 95% CIs).
Results: BENCHMARKS.md "Revenue, issue 17, third pass".
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch

from bundleflow.evaluation.evaluate import paired_ratio_ci
from bundleflow.evaluation.mechanism import FrozenMechanism
from bundleflow.maths.polish import polish_prices
from bundleflow.train.config import load_config
from bundleflow.train.data import fitted_baselines, load_run_data


def option_parts(mech: FrozenMechanism, valuations: torch.Tensor):
    """Element values [N, J], the fallback's utility and payment [N] (float64)."""
    values = mech.utilities(valuations).double() + mech.prices.double()
    if mech.fallback is None:
        n = valuations.shape[0]
        none = torch.full((n,), -torch.inf, dtype=torch.float64, device=values.device)
        return values, none, torch.zeros_like(none)
    fb_u, fb_pay = mech.fallback.outcome(valuations)
    return values, fb_u.double(), fb_pay.double()


def fmt(xs: list[float]) -> str:
    return " ".join(f"{x:.2f}" for x in xs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--data", default=None, help="polish/validate/test on this file's split")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--min-buyers", type=int, nargs="+", default=[1])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    cfg = load_config(str(a.run / "config.yaml"))
    data = load_run_data(cfg.data, torch.device("cpu"), data_file=a.data)
    mech = FrozenMechanism.load(a.run / "mechanism.safetensors", device=a.device)
    val_user = data.val.cpu().clone()
    val_user[..., -1] *= data.scale  # back to the user's money, like the mechanism
    train = option_parts(mech, data.train_user.to(a.device))
    val = option_parts(mech, val_user.to(a.device))
    test = data.test.to(a.device)
    base = fitted_baselines(data.train_user).payments(data.test)["bundle_size_pricing"]
    pay0 = mech.outcome(test)[1].cpu()
    before = paired_ratio_ci(pay0, base)
    out: dict = {"run": str(a.run), "data": a.data, "before": before}
    print(f"{a.run.name}: test {float(pay0.mean()):.2f}, ÷ size pricing {before['ratio']:.4f} "
          f"{before['ci95']}")  # fmt: skip
    for k in a.min_buyers:
        gen = torch.Generator().manual_seed(a.seed)
        res = polish_prices(train[0], mech.prices, train[1], train[2], rounds=a.rounds,
                            min_buyers=k, val=val, generator=gen)  # fmt: skip
        polished = replace(mech, prices=res.prices.to(mech.prices.dtype))
        pay1 = polished.outcome(test)[1].cpu()
        ratio, gain = paired_ratio_ci(pay1, base), paired_ratio_ci(pay1, pay0)
        print(f"  min_buyers {k}: train {fmt(res.train_revenue)} | val {fmt(res.val_revenue)} | "
              f"changed {res.changed} | kept round {res.round_kept}")  # fmt: skip
        print(f"  test {float(pay1.mean()):.2f}, ÷ size pricing {ratio['ratio']:.4f} "
              f"{ratio['ci95']}, ÷ unpolished {gain['ratio']:.4f} {gain['ci95']}")  # fmt: skip
        out[f"min_buyers_{k}"] = {
            "ratio": ratio, "vs_unpolished": gain, "train": res.train_revenue,
            "val": res.val_revenue, "kept": res.round_kept, "changed": res.changed,
        }  # fmt: skip
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
