"""The end of Stage 2: a frozen menu's exact price polish on the training split (kept by
validation), and reading a finished run's mechanism back."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from loguru import logger

from bundleflow.errors import BundleflowError
from bundleflow.evaluation.mechanism import FrozenMechanism
from bundleflow.maths.menu import lottery_utilities
from bundleflow.maths.polish import SoftPhase, polish_prices
from bundleflow.paths import RUN_INFO, runs_root
from bundleflow.train.config import Config
from bundleflow.train.data import RunData

MECHANISM_FILE = "mechanism.safetensors"


@torch.no_grad()
def polish_mechanism(mech: FrozenMechanism, data: RunData, cfg: Config) -> float:
    """Exact hard-revenue price polish of the frozen best menu on the training split,
    the round kept by validation (``stage2.polish_rounds``; :mod:`bundleflow.maths.polish`).

    The polish works in float64 on the lotteries' exact values; the mechanism keeps float32
    prices and plays in float32. So a new price sits ``margin`` = 1e-6 or 4 float32 ulps of
    the largest value, whichever is larger, below its marginal bidder's threshold (a bidder
    the polish counts as buying still buys after rounding), and the stored prices are
    checked on validation the way the report plays them: if they earn less there than the
    unpolished menu, that one is kept."""
    device, batch = mech.prices.device, cfg.eval.batch_size
    train = data.train_user.to(device)
    val = data.denormalise(data.val).to(device)
    values, fb_u, fb_pay = _outcome_columns(mech, train, batch)
    before_prices, before_val = mech.prices.clone(), mech.revenue(val, batch_size=batch)
    result = polish_prices(
        values,
        mech.prices,
        fb_u,
        fb_pay,
        rounds=cfg.stage2.polish_rounds,
        margin=max(1e-6, 4 * torch.finfo(torch.float32).eps * float(values.max())),
        val=_outcome_columns(mech, val, batch),
        generator=torch.Generator().manual_seed(cfg.stage2.seed),
        plateau=True,
        min_z=cfg.stage2.select_min_z,
        soft=SoftPhase(
            steps=cfg.stage2.polish_soft_steps,
            temp=cfg.stage2.polish_soft_temp * mech.money_scale,
            lr=cfg.stage2.polish_soft_lr * mech.money_scale,
        ),
    )
    mech.prices = result.prices.to(device, mech.prices.dtype)
    played = mech.revenue(val, batch_size=batch)
    kept = result.round_kept
    if played < before_val:
        logger.warning(
            "stage 2 polish: the stored prices earn {:.6g} on validation against {:.6g} "
            "unpolished; the unpolished prices are kept",
            played,
            before_val,
        )
        mech.prices, played, kept = before_prices, before_val, 0
    mech.meta["polish"] = {
        "round_kept": kept,
        "train_revenue": result.train_revenue,
        "val_revenue": result.val_revenue,
        "changed": result.changed,
    }
    logger.info(
        "stage 2 polish: validation revenue {:.6g} -> {:.6g} (round {} of {} kept)",
        before_val,
        played,
        kept,
        len(result.val_revenue) - 1,
    )
    return played


def _outcome_columns(mech: FrozenMechanism, valuations: torch.Tensor, batch: int):
    """(element values ``[N, J]``, the fallback's utility ``[N]`` (−inf: none) and payment
    ``[N]``) of a frozen mechanism, user units, float64: Σ_d α_jd v(S_jd) summed in float64,
    not float32 utilities plus prices (that rounding, ~1e-6 at values near 2, is as large as
    the polish's margin)."""
    alpha = mech.alpha.double()
    zero = alpha.new_zeros(alpha.shape[0])

    def chunk_values(chunk: torch.Tensor) -> torch.Tensor:
        chunk = chunk.to(mech.prices.device)
        if chunk.dim() == 2:  # additive: one float64 product
            chunk = chunk.double()
        return lottery_utilities(mech.bundles.to(chunk.dtype), alpha, zero, chunk)

    n = valuations.shape[0]
    values, start = None, 0  # filled in place: a list of chunks and their concatenation is 2x
    for chunk in valuations.split(batch):
        part = chunk_values(chunk)
        if values is None:
            values = part.new_empty((n, part.shape[1]))
        values[start : start + part.shape[0]] = part
        start += part.shape[0]
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
