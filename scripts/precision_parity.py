"""Evaluation parity of one trained menu frozen with the flow network in fp32, bf16, fp16.

    python scripts/precision_parity.py RUN_DIR [--device cuda]

Takes the run's best menu (``RUN_DIR/best``), its flow and its data's test split, freezes
the menu with the recorded evaluation noise three times — Q evaluated in float32, under
bf16 autocast and under fp16 autocast (everything after Q stays float32, as in training)
— and prints one JSON object: bundle entries that differ from fp32, max |Δα|, and the hard
test revenue of each (user units), plus how many test bidders choose differently.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bundleflow.maths.menu import Menu, lottery_utilities  # noqa: E402
from bundleflow.maths.revenue import hard_outcome  # noqa: E402
from bundleflow.train.checkpoint import read_checkpoint  # noqa: E402
from bundleflow.train.config import load_config  # noqa: E402
from bundleflow.train.data import load_run_data  # noqa: E402
from bundleflow.train.stage1 import load_flow_ckpt  # noqa: E402

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    cfg = load_config(str(args.run / "config.yaml"))
    data = load_run_data(cfg.data, torch.device("cpu"))
    flow, _ = load_flow_ckpt(str(args.run), data.n_items)
    flow = flow.to(device)
    components, manifest = read_checkpoint(args.run / "best")
    state = components["menu"]
    menu = Menu.from_tensors(
        state["means"], state["logits"], state["std"], state["prices"],
        loc_offset=cfg.menu.loc_offset, loc_scale=cfg.menu.loc_scale,
    ).to(device)  # fmt: skip
    J, D, m = menu.means.shape
    eps = torch.randn((J, D, m), generator=torch.Generator().manual_seed(cfg.eval.seed))
    eps = eps.to(device)
    test = data.normalise(data.test).to(device)
    mix_temp = manifest["extra"]["mix_temp"]
    out: dict = {"run": str(args.run), "device": str(device), "test_valuations": len(test)}
    if device.type == "cuda":
        out["device_name"] = torch.cuda.get_device_name(device)
    base = None
    with torch.no_grad():
        for name, dtype in DTYPES.items():
            lot = menu.lotteries(
                flow, mix_temp, eps=eps, n_steps=cfg.flow.euler_steps, q_dtype=dtype
            )
            choices, payments = [], []
            for start in range(0, len(test), 1024):
                u = lottery_utilities(
                    lot.bundles, lot.alpha, menu.prices, test[start : start + 1024]
                )
                c, pay = hard_outcome(u, menu.prices)
                choices.append(c)
                payments.append(pay)
            choice, pay = torch.cat(choices), torch.cat(payments)
            entry = {"revenue": float(pay.double().mean()) * data.scale}
            if base is None:
                base = (lot.bundles, lot.alpha, choice, entry["revenue"])
            else:
                entry.update(
                    bundle_entries_differing=int((lot.bundles != base[0]).sum()),
                    bundle_entries=int(lot.bundles.numel()),
                    alpha_max_abs_diff=float((lot.alpha - base[1]).abs().max()),
                    bidders_choosing_differently=int((choice != base[2]).sum()),
                    revenue_rel_diff=(entry["revenue"] - base[3]) / base[3],
                )
            out[name] = entry
    sys.stdout.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
