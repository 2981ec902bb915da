"""Evaluating a frozen mechanism: hard revenue with its uncertainty and the sanity checks."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from bundleflow.evaluation.baselines import FittedBaselines, distinct_rows, fit_baselines
from bundleflow.evaluation.mechanism import FrozenMechanism
from bundleflow.maths.revenue import WALK_AWAY
from bundleflow.valuations.known import optimal_payments_for

Z95 = 1.959963984540054
BASELINES = ("grand_bundle", "uniform_item_price", "item_pricing", "bundle_size_pricing")
"""The posted-price baselines, in report order (the upper bound is reported apart)."""
RATIO_METHOD = "delta method on paired per-valuation payments (same test valuations)"


def mean_ci(samples: Tensor) -> dict:
    """Mean and 95% normal-approximation confidence interval of per-valuation payments."""
    x = samples.double()
    n = x.numel()
    mean = float(x.mean())
    half = Z95 * float(x.std(unbiased=True)) / math.sqrt(n) if n > 1 else float("nan")
    return {"mean": mean, "ci95": [mean - half, mean + half], "n": n}


def paired_ratio_ci(numerator: Tensor, denominator: Tensor) -> dict:
    """Ratio of means R = ā / b̄ of paired per-valuation payments with a 95% delta-method CI.

    With d_i = a_i − R·b_i, Var(R̂) ≈ Var(d) / (n·b̄²); pairing (both mechanisms scored on
    the same valuations) removes the common valuation noise from the interval.
    """
    a, b = numerator.double(), denominator.double()
    n = a.numel()
    mean_b = float(b.mean())
    if n < 2 or mean_b <= 0:
        ratio = float(a.mean()) / mean_b if mean_b > 0 else float("inf")
        return {"ratio": ratio, "ci95": [float("nan"), float("nan")], "method": RATIO_METHOD}
    ratio = float(a.mean()) / mean_b
    half = Z95 * float((a - ratio * b).std(unbiased=True)) / (math.sqrt(n) * mean_b)
    return {"ratio": ratio, "ci95": [ratio - half, ratio + half], "method": RATIO_METHOD}


PAIRED_OPTIMUM_METHOD = (
    "paired: mean payment ÷ the optimal mechanism's mean payment on the same test valuations, "
    "95% CI by the delta method on the paired per-valuation payments"
)
UNPAIRED_OPTIMUM_METHOD = (
    "unpaired: the test revenue's 95% CI over the population optimum (no explicit optimal "
    "mechanism to pair with)"
)


def optimum_base(known: dict) -> dict:
    """The data's known optimum (``known``: a data file's ``known`` metadata or run.json's
    ``data.known``) as the report's ``optimum`` record, before any comparison."""
    return {
        "value": float(known["optimum"]),
        "kind": known.get("optimum_kind", "exact"),
        **{k: known.get(k) for k in ("setting", "parameters", "mechanism", "source")},
        "best_deterministic": known.get("best_deterministic"),
        "best_posted_price": known.get("best_posted_price"),
    }


def unpaired_optimum(record: dict, revenue: dict) -> dict:
    """``record`` with the unpaired ratio: the test revenue and its 95% CI over the
    population optimum; ``above_optimum`` when the whole CI lies above it. Sampling noise of
    the test sample is not removed (a full-surplus mechanism on a sample whose realised
    surplus is high reads above a full-surplus optimum): used only where no explicit optimal
    mechanism exists."""
    value = record["value"]
    lo, hi = revenue["ci95"]
    return {
        **record,
        "paired": False,
        "ratio": {
            "ratio": revenue["mean"] / value,
            "ci95": [lo / value, hi / value],
            "method": UNPAIRED_OPTIMUM_METHOD,
            "paired": False,
        },  # fmt: skip
        "above_optimum": bool(lo > value),
    }


def paired_optimum(record: dict, optimal: Tensor, payments: dict[str, Tensor]) -> dict:
    """``record`` with paired ratios to the optimal mechanism's payments ``optimal`` ``[N]``
    on the same test valuations: ``ratio`` for ``payments["menu"]`` (when given) and
    ``baselines`` for the rest; each is flagged ``above_optimum`` only when its paired CI's
    lower end is above 1. ``optimal_on_test``: the optimal mechanism's revenue on this
    sample (it differs from the population optimum by the sample's noise)."""
    out = {**record, "paired": True, "optimal_on_test": mean_ci(optimal)}
    ratios = {}
    for name, pay in payments.items():
        ratio = paired_ratio_ci(pay, optimal)
        ratio.update(method=PAIRED_OPTIMUM_METHOD, paired=True)
        ratios[name] = ratio
    if "menu" in ratios:
        out["ratio"] = ratios.pop("menu")
        out["above_optimum"] = bool(out["ratio"]["ci95"][0] > 1)
    out["baselines"] = {
        name: {**r, "above_optimum": bool(r["ci95"][0] > 1)} for name, r in ratios.items()
    }
    return out


def optimum_comparison(
    known: dict, test: Tensor, payments: dict[str, Tensor], revenue: dict | None = None
) -> dict:
    """The report's ``optimum`` record: paired (:func:`paired_optimum`) where the setting's
    optimal mechanism is explicit (:func:`bundleflow.valuations.known.optimal_payments_for`),
    else unpaired for ``revenue`` (:func:`unpaired_optimum`)."""
    record = optimum_base(known)
    found = distinct_rows(test) if test.dim() == 3 else None  # identical rows scored once
    if found is None:
        optimal = optimal_payments_for(known, test)
    else:
        distinct, inverse = found
        optimal = optimal_payments_for(known, distinct)
        optimal = None if optimal is None else optimal[inverse]
    if optimal is not None and float(optimal.mean()) > 0:
        return paired_optimum(record, optimal, payments)
    if revenue is not None and record["value"] > 0:
        return unpaired_optimum(record, revenue)
    return {**record, "paired": False}


def score_baselines(fitted: FittedBaselines, test: Tensor) -> tuple[dict, dict[str, Tensor]]:
    """Every baseline's test revenue (mean, 95% CI, fraction of E[max value], parameters)
    and the per-valuation payments ``[N]`` (for paired comparisons)."""
    payments = fitted.payments(test)
    upper = float(payments["upper_bound"].mean())
    params = fitted.params()
    out = {}
    for name in (*BASELINES, "upper_bound"):
        revenue = mean_ci(payments[name])
        out[name] = {
            "revenue": revenue,
            "fraction_of_max_value": revenue["mean"] / upper if upper > 0 else float("nan"),
            "n_test": revenue["n"],
            **params.get(name, {}),
        }
    return out, payments


def best_baseline(scored: dict) -> str:
    """The baseline of highest test revenue (first in :data:`BASELINES` order on ties)."""
    return max(BASELINES, key=lambda name: scored[name]["revenue"]["mean"])


def baselines_report(train: Tensor, test: Tensor) -> dict:
    """Fit every baseline on ``train``, score on ``test``: what `bundleflow baselines` prints."""
    scored, payments = score_baselines(fit_baselines(train), test)
    best = best_baseline(scored)
    for name in BASELINES:
        scored[name]["ratio_to_best_baseline"] = paired_ratio_ci(payments[name], payments[best])
    return {
        "n_train": int(train.shape[0]),
        "n_test": int(test.shape[0]),
        "expected_max_value": scored["upper_bound"]["revenue"]["mean"],
        "best_baseline": best,
        "mechanisms": scored,
    }


def json_safe(value: Any) -> Any:
    """``value`` with NaN/±inf replaced by None (JSON has no such numbers; ``json.dumps``
    would write ``NaN``/``Infinity``, which strict parsers such as jq reject)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


@torch.no_grad()
def evaluate_mechanism(
    mech: FrozenMechanism,
    test: Tensor,
    train: Tensor,
    *,
    batch_size: int = 1024,
    fitted: FittedBaselines | None = None,
    known: dict | None = None,
    device: torch.device | str | None = None,
) -> dict:
    """Hard revenue of ``mech`` on ``test`` (user units) beside every baseline.

    ``device``: where the mechanism plays the test split (the rest stays on the CPU); a run
    passes its GPU. On the CPU, the play dominated the report on a GPU machine: DDT with
    500,000 test valuations and 1,000 lotteries of 8 bundles spent 49 s in this function on
    an H100 host (5.9 s per 100,000 on 2 cores), and runs sharing the host starved it.

    Baselines are fitted on ``train`` (or given, already fitted on it, as ``fitted``) and
    scored on ``test``; ``baselines`` holds each one's test revenue and
    ``ratio_to_best_baseline`` the menu's revenue over the best one's with a paired CI. IR
    is checked on the utilities actually realised: a buyer whose chosen element has
    negative utility is a violation (must be 0 by construction).

    ``known`` (the data's known-optimum record): ``optimum`` holds the menu's and every
    baseline's ratio to the optimum, paired on ``test`` where the optimal mechanism is
    explicit (:func:`optimum_comparison`).
    """
    player = mech if device is None else mech.to(device)
    choice, payment, realised_u = (x.cpu() for x in player.play(test, batch_size=batch_size))
    buys = choice != WALK_AWAY
    J = mech.menu_size
    on_menu = buys & (choice < J)  # choice J: the fallback's posted prices
    revenue = mean_ci(payment)
    if fitted is None:
        fitted = fit_baselines(train)  # the grand bundle is one of them: fitted once
    scored, base_pay = score_baselines(fitted, test)
    upper = scored["upper_bound"]["revenue"]["mean"]
    gb_price = fitted.grand_bundle_price
    gb = dict(scored["grand_bundle"]["revenue"])
    prices = mech.prices.cpu()
    best = best_baseline(scored)
    for name in BASELINES:
        scored[name]["ratio_to_best_baseline"] = paired_ratio_ci(base_pay[name], base_pay[best])
    used = choice[on_menu]
    report = {
        "n_test": int(test.shape[0]),
        "revenue": revenue,
        "fraction_of_max_value": revenue["mean"] / upper if upper > 0 else float("nan"),
        "expected_max_value": upper,
        "grand_bundle": {
            "price": gb_price,
            "revenue": gb,
            "fraction_of_max_value": gb["mean"] / upper if upper > 0 else float("nan"),
        },
        "ratio_to_grand_bundle": revenue["mean"] / gb["mean"] if gb["mean"] > 0 else float("inf"),
        "ir_violations": int(((realised_u < 0) & buys).sum()),
        "buy_rate": float(buys.double().mean()),
        "elements_in_use": int(torch.unique(used).numel()),
        "menu_size": J,
        "negative_price_purchases": int(
            (on_menu & (prices[choice.clamp(min=0, max=J - 1)] < 0)).sum()
        ),
        "baselines": scored,
        "best_baseline": best,
        "ratio_to_best_baseline": paired_ratio_ci(payment, base_pay[best]),
        "menu": menu_statistics(mech, torch.bincount(used, minlength=J)),
    }
    if mech.fallback is not None:
        report["fallback"] = fallback_statistics(mech, choice, payment)
    if known is not None and "optimum" in known:
        pays = {"menu": payment, **{name: base_pay[name] for name in BASELINES}}
        report["optimum"] = optimum_comparison(known, test, pays, revenue)
    return report


def fallback_statistics(mech: FrozenMechanism, choice: Tensor, payment: Tensor) -> dict:
    """How much the fallback (choice J) does: its kind, the fraction of test bidders who buy
    at the posted prices, and its share of the revenue."""
    chosen = choice == mech.menu_size
    total = float(payment.double().sum())
    from_fallback = float(payment.double()[chosen].sum())
    return {
        "kind": mech.fallback.kind,
        "chosen_fraction": float(chosen.double().mean()) if choice.numel() else 0.0,
        "revenue_share": from_fallback / total if total > 0 else float("nan"),
    }


LOTTERY_MIN_PROB = 1e-3
"""Support points below this probability are left out of lottery sizes and listings."""


def menu_statistics(mech: FrozenMechanism, counts: Tensor) -> dict:
    """Per element ``[J]``: price, expected bundle size Σ_d α_jd·|S_jd|, distinct bundles in
    the lottery with probability ≥ :data:`LOTTERY_MIN_PROB`, and test purchases ``counts``."""
    bundles = mech.bundles.cpu().bool()  # (J, D, m)
    alpha = mech.alpha.cpu().double()  # (J, D)
    expected_size = (alpha * bundles.sum(dim=-1)).sum(dim=-1)  # (J,)
    # (J, D, 1, m) == (J, 1, D, m) -> (J, D, D): support points holding the same bundle
    same = (bundles[:, :, None, :] == bundles[:, None, :, :]).all(dim=-1)
    significant = alpha >= LOTTERY_MIN_PROB
    earlier = torch.ones_like(same[0]).tril(diagonal=-1)  # (D, D): d' < d
    repeated = (same & earlier & significant[:, None, :]).any(dim=-1)  # (J, D)
    distinct = (significant & ~repeated).sum(dim=-1)
    return {
        "prices": mech.prices.cpu().double().tolist(),
        "expected_bundle_size": expected_size.tolist(),
        "lottery_size": distinct.tolist(),
        "purchases": counts.tolist(),
    }
