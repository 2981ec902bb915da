"""The end of Stage 2: a frozen menu's exact price polish on the training split (kept by
validation), and reading a finished run's mechanism back."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from loguru import logger

from bundleflow.errors import BundleflowError
from bundleflow.evaluation.mechanism import FrozenMechanism
from bundleflow.maths.polish import SoftPhase, polish_prices
from bundleflow.paths import RUN_INFO, runs_root
from bundleflow.train.config import Config
from bundleflow.train.data import RunData

MECHANISM_FILE = "mechanism.safetensors"


@torch.no_grad()
def polish_mechanism(mech: FrozenMechanism, data: RunData, cfg: Config) -> float:
    """Exact hard-revenue price polish of the frozen best menu on the training split,
    the round kept by validation (``stage2.polish_rounds``; :mod:`bundleflow.maths.polish`)."""
    device, batch = mech.prices.device, cfg.eval.batch_size
    train = data.train_user.to(device)
    val = data.denormalise(data.val).to(device)
    values, fb_u, fb_pay = _outcome_columns(mech, train, batch)
    result = polish_prices(
        values,
        mech.prices,
        fb_u,
        fb_pay,
        rounds=cfg.stage2.polish_rounds,
        val=_outcome_columns(mech, val, batch),
        generator=torch.Generator().manual_seed(cfg.stage2.seed),
        plateau=True,
        soft=SoftPhase(
            steps=cfg.stage2.polish_soft_steps,
            temp=cfg.stage2.polish_soft_temp * mech.money_scale,
            lr=cfg.stage2.polish_soft_lr * mech.money_scale,
        ),
    )
    mech.prices = result.prices.to(device, mech.prices.dtype)
    mech.meta["polish"] = {
        "round_kept": result.round_kept,
        "train_revenue": result.train_revenue,
        "val_revenue": result.val_revenue,
        "changed": result.changed,
    }
    logger.info(
        "stage 2 polish: validation revenue {:.6g} -> {:.6g} (round {} of {} kept)",
        result.val_revenue[0],
        result.val_revenue[result.round_kept],
        result.round_kept,
        len(result.val_revenue) - 1,
    )
    return result.val_revenue[result.round_kept]


def _outcome_columns(mech: FrozenMechanism, valuations: torch.Tensor, batch: int):
    """(element values ``[N, J]``, the fallback's utility ``[N]`` (−inf: none) and payment
    ``[N]``) of a frozen mechanism, user units, float64."""
    values = (
        torch.cat([mech.utilities(chunk).double() for chunk in valuations.split(batch)])
        + mech.prices.double()
    )
    n = values.shape[0]
    if mech.fallback is None:
        return values, values.new_full((n,), -math.inf), values.new_zeros(n)
    u, pay = mech.fallback.outcome(valuations.to(mech.prices.device))
    return values, u.double(), pay.double()


def read_mechanism(run_dir: Path) -> FrozenMechanism:
    """A finished run's frozen mechanism; a user error naming what the path lacks otherwise."""

    root = runs_root()
    runs = f"`ls {root}` lists the runs" if root.is_dir() else f"no runs in {root} yet"
    if not run_dir.exists():
        raise BundleflowError(f"{run_dir}: no such run directory; {runs}")
    if not (run_dir / RUN_INFO).is_file():
        raise BundleflowError(f"{run_dir}: not a bundleflow run directory (no {RUN_INFO}); {runs}")
    path = run_dir / MECHANISM_FILE
    if not path.is_file():
        raise BundleflowError(
            f"{run_dir}: no {MECHANISM_FILE}; the run has not finished Stage 2 "
            f"(resume it with `bundleflow train --resume {run_dir}`)"
        )
    return FrozenMechanism.load(path)
