"""A run's report: ``report.json``, ``report.md`` and PNG plots in the run directory.

Reads what evaluation produced (:func:`~bundleflow.evaluation.evaluate.evaluate_mechanism`) and
the run's ``metrics.jsonl``; draws with matplotlib's object API on the Agg canvas (no
pyplot state, no display).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

from loguru import logger

from bundleflow.atomic import atomic_write_bytes
from bundleflow.evaluation.evaluate import BASELINES, json_safe, optimum_base, unpaired_optimum
from bundleflow.paths import METRICS_FILE

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
REVENUE_PNG = "revenue.png"
MENU_PNG = "menu.png"


LABELS = {
    "menu": "learned menu",
    "menu_fallback": "learned menu + fallback",
    "grand_bundle": "grand bundle",
    "uniform_item_price": "uniform item price",
    "item_pricing": "item pricing",
    "bundle_size_pricing": "bundle-size pricing",
    "upper_bound": "upper bound E[max value]",
    "optimum": "optimum (exact)",
    "ratio_to_optimum": "ratio to optimum",
    "optimal_on_test": "optimal mechanism on these test valuations",
}
ABOVE_OPTIMUM = "ABOVE OPTIMUM — evaluation bug"
"""The flag of a mechanism whose test revenue is above the data's optimum beyond its CI
(paired: the lower end of its paired ratio's CI above 1)."""


def pairing(opt: dict) -> str:
    """``paired`` or ``unpaired``: how a report's ratio to the optimum was formed."""
    return "paired" if opt.get("paired") else "unpaired"


BASELINE_STYLE = {
    "grand_bundle": (":", "tab:gray"),
    "uniform_item_price": ("-.", "tab:green"),
    "item_pricing": ("--", "tab:orange"),
    "bundle_size_pricing": ("--", "tab:purple"),
    "upper_bound": ("-", "black"),
}


# --------------------------------------------------------------------------- text


def _fmt(x: float | None, digits: int = 5) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}g}"


def _ci(pair: list) -> str:
    return f"[{_fmt(pair[0])}, {_fmt(pair[1])}]"


def comparison_rows(report: dict) -> list[dict]:
    """One row per mechanism: the menu (when there is one), every baseline, the upper bound."""
    rows = []
    if "revenue" in report:
        rows.append(
            {
                "name": "menu_fallback" if "fallback" in report else "menu",
                "revenue": report["revenue"],
                "fraction": report["fraction_of_max_value"],
                "ratio": report.get("ratio_to_best_baseline"),
            }
        )
    mechanisms = report.get("baselines") or report.get("mechanisms") or {}
    for name in (*BASELINES, "upper_bound"):
        if name in mechanisms:
            entry = mechanisms[name]
            rows.append(
                {
                    "name": name,
                    "revenue": entry["revenue"],
                    "fraction": entry["fraction_of_max_value"],
                    "ratio": entry.get("ratio_to_best_baseline"),
                }
            )
    return rows + optimum_rows(report)


def optimum_rows(report: dict) -> list[dict]:
    """Where the data have a known optimum (``report["optimum"]``): its row, the optimal
    mechanism's revenue on the test valuations (paired records) and the mechanism's ratio to
    the optimum — paired (mean payment ÷ the optimal mechanism's on the same valuations, with
    the paired 95% CI) or unpaired (the test revenue's 95% CI over the optimum), as labelled."""
    opt = report.get("optimum")
    if not opt:
        return []
    upper = report.get("expected_max_value")
    label = f"optimum ({opt.get('kind', 'exact')})"
    rows = [
        {
            "name": "optimum",
            "label": label,
            "revenue": {"mean": opt["value"], "ci95": None},
            "fraction": opt["value"] / upper if upper else None,
            "ratio": None,
        }
    ]
    on_test = opt.get("optimal_on_test")
    if on_test:
        rows.append(
            {
                "name": "optimal_on_test",
                "revenue": on_test,
                "fraction": on_test["mean"] / upper if upper else None,
                "ratio": None,
            }
        )
    if opt.get("ratio"):
        flag = f" ({ABOVE_OPTIMUM})" if opt.get("above_optimum") else ""
        rows.append(
            {
                "name": "ratio_to_optimum",
                "label": f"{LABELS['ratio_to_optimum']} ({pairing(opt)}){flag}",
                "revenue": {"mean": opt["ratio"]["ratio"], "ci95": opt["ratio"]["ci95"]},
                "fraction": None,
                "ratio": None,
            }
        )
    return rows


def optimum_record(report: dict, known: dict) -> dict:
    """The data's known optimum (``known``: the data's ``known`` metadata) beside the
    mechanism's test revenue, UNPAIRED: the ratio with the revenue's 95% CI over the optimum
    (a constant), and ``above_optimum`` when the whole CI lies above it. For a report made
    without the test valuations at hand; evaluation pairs where it can
    (:func:`bundleflow.evaluation.evaluate.optimum_comparison`)."""
    record = optimum_base(known)
    if "revenue" in report and record["value"] > 0:
        return unpaired_optimum(record, report["revenue"])
    return {**record, "paired": False}


def _run_known(run_dir: Path) -> dict | None:
    """The known optimum of a run's data (run.json's ``data.known``), if any."""
    with contextlib.suppress(OSError, ValueError):
        info = json.loads((run_dir / "run.json").read_text())
        known = (info.get("data") or {}).get("known")
        return known if isinstance(known, dict) and "optimum" in known else None
    return None


def comparison_cells(report: dict) -> tuple[list[str], list[list[str]]]:
    """The comparison table as (head, rows) of text cells: mechanism, test revenue with 95%
    CI, fraction of E[max value], paired ratio to the best baseline with its 95% CI."""
    head = ["mechanism", "test revenue", "95% CI", "of E[max]", "÷ best baseline", "paired 95% CI"]
    body = []
    for row in comparison_rows(report):
        ratio = row["ratio"]
        body.append(
            [
                row.get("label") or LABELS[row["name"]],
                _fmt(row["revenue"]["mean"]),
                "" if row["revenue"]["ci95"] is None else _ci(row["revenue"]["ci95"]),
                "" if row["fraction"] is None else _fmt(row["fraction"], 4),
                "" if ratio is None else _fmt(ratio["ratio"], 4),
                "" if ratio is None else _ci([_round(x) for x in ratio["ci95"]]),
            ]
        )
    return head, body


def comparison_table(report: dict, *, markdown: bool = False) -> str:
    """:func:`comparison_cells` as aligned text or (``markdown``) a markdown table."""
    head, body = comparison_cells(report)
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
        for r in [head, *body]
    )


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def format_summary(r: dict, *, table: bool = True) -> str:
    """The evaluation in a few lines and (``table``) the comparison table."""
    rev = r["revenue"]
    lines = [
        f"test revenue (hard, {rev['n']} valuations): {rev['mean']:.5g} "
        f"[95% CI {rev['ci95'][0]:.5g}, {rev['ci95'][1]:.5g}]",
        f"  fraction of E[max value] ({r['expected_max_value']:.5g}): "
        f"{r['fraction_of_max_value']:.4f}",
        f"  IR violations: {r['ir_violations']}; elements in use: {r['elements_in_use']} of "
        f"{r['menu_size']}; buy rate {r['buy_rate']:.3f}; negative-price purchases: "
        f"{r['negative_price_purchases']}",
    ]
    if "fallback" in r:
        fb = r["fallback"]
        lines.append(
            f"  fallback ({fb['kind']} pricing, option {r['menu_size']}): chosen by "
            f"{fb['chosen_fraction']:.3f} of test bidders, {_fmt(fb['revenue_share'], 3)} of "
            "the revenue"
        )
    if "best_baseline" in r:
        ratio = r["ratio_to_best_baseline"]
        lines.append(
            f"  best baseline: {LABELS[r['best_baseline']]}; menu / best = "
            f"{_fmt(ratio['ratio'], 4)} (paired 95% CI {_ci(ratio['ci95'])})"
        )
    lines.append("  " + learned_line(r))
    opt = r.get("optimum") or {}
    if opt.get("ratio"):
        ratio = opt["ratio"]
        flag = f" {ABOVE_OPTIMUM}" if opt.get("above_optimum") else ""
        lines.append(
            f"  optimum {_fmt(opt['value'])} ({opt.get('kind', 'exact')}); ratio to it "
            f"({pairing(opt)}): {_fmt(ratio['ratio'], 4)} (95% CI {_ci(ratio['ci95'])}){flag}"
        )
    if "best_baseline" in r and table:
        lines += ["", comparison_table(r)]
    eager = eager_line(r)
    if eager is not None:
        lines.append("  " + eager)
    if "wall_time" in r:
        device = r.get("device_name", r.get("device"))
        lines.append(f"training wall time {r['wall_time']:.1f} s on {device}")
        segments = r.get("segments") or []
        if len(segments) > 1:  # a resumed run: every session's time is in the total
            each = " + ".join(f"{s['wall_time']:.1f} s" for s in segments)
            lines.append(f"  over {len(segments)} sessions (stopped and resumed): {each}")
    if "evaluation_time" in r:
        lines.append(
            f"evaluation time {r['evaluation_time']:.1f} s on "
            f"{r.get('evaluation_device', 'cpu')} (this command)"
        )
    return "\n".join(lines)


def learned_line(r: dict) -> str:
    """In plain words: are learned elements bought, and what does the mechanism add over the
    best posted price (issue 27: a run that ties the posted price must say so)."""
    fb = r.get("fallback")
    share = 1.0 - fb["revenue_share"] if fb and fb["revenue_share"] == fb["revenue_share"] else 1.0
    bought = r["buy_rate"] - (fb["chosen_fraction"] if fb else 0.0)
    if r["elements_in_use"] == 0:
        text = "learned elements: none bought" + (
            f"; the mechanism is the fallback's {fb['kind']} pricing alone" if fb else ""
        )
    else:
        text = (
            f"learned elements: bought by {bought:.1%} of test bidders ({r['elements_in_use']} "
            f"of {r['menu_size']} elements), {share:.1%} of the revenue"
        )
    if "best_baseline" in r:
        ratio = r["ratio_to_best_baseline"]
        text += (
            f"; the mechanism earns {_fmt(ratio['ratio'], 4)}x the best posted price "
            f"({LABELS[r['best_baseline']]}, paired 95% CI {_ci(ratio['ci95'])})"
        )
    return text


def eager_line(r: dict) -> str | None:
    """The finding of a run whose Stage-2 step ran eager because ``torch.compile`` failed
    (run.json's ``step_plan.eager``, copied into the report), or None."""
    eager = (r.get("step_plan") or {}).get("eager")
    if not eager:
        return None
    return (
        "eager: compile failed, so the Stage-2 step ran eager (on CUDA about 2x slower per "
        f"step): {eager['why']}. Fix: {eager['fix']}"
    )


def format_baselines(r: dict) -> str:
    """`bundleflow baselines` as text."""
    return "\n".join(
        [
            f"baselines fitted on {r['n_train']} training valuations, scored on {r['n_test']} "
            f"test valuations; E[max value] {r['expected_max_value']:.5g}",
            comparison_table(r),
        ]
    )


def markdown(report: dict, plots: list[str]) -> str:
    """``report.md``: summary, the comparison table, the plots."""
    parts = ["# Report", ""]
    if "run" in report:
        parts += [f"Run: `{report['run']}`", ""]
    if "revenue" in report:
        parts += ["```", format_summary(report, table=False), "```", ""]
    parts += [
        "## Test revenue",
        "",
        comparison_table(report, markdown=True),
        "",
        "Hard revenue (argmax, ties to the lowest index, buy iff utility ≥ 0) on the test "
        "split; baselines fitted on the training split. 95% CIs: normal approximation. "
        "Ratio to the best baseline: ratio of mean payments on the same test valuations, "
        "95% CI by the delta method on the paired per-valuation payments. Where the data "
        "have a known optimum: its value and the ratio to it, labelled paired or unpaired. "
        "Paired (the optimal mechanism is explicit): mean payment ÷ the optimal mechanism's "
        "mean payment on the same test valuations (its revenue there is shown), 95% CI by the "
        "delta method on the paired payments; flagged above the optimum only when the CI's "
        "lower end is above 1. Unpaired: the test revenue and its 95% CI over the population "
        "optimum (test-sample noise included).",
        "",
    ]
    for name in plots:
        parts += [f"![{name}]({name})", ""]
    return "\n".join(parts)


# --------------------------------------------------------------------------- plots


def read_metrics(path: Path) -> list[dict]:
    """Stage-2 records of ``metrics.jsonl`` (a torn last line is skipped)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("stage") == 2:
            records.append(record)
    return records


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def revenue_figure(records: list[dict], report: dict) -> bytes:
    """Hard (validation) and soft revenue against step and wall time; baselines' test
    revenue as horizontal lines."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5))
    axes = fig.subplots(1, 2)
    hard = [r for r in records if "val_revenue" in r]
    soft = [r for r in records if "soft_revenue" in r]
    for ax, key, label in ((axes[0], "step", "Stage-2 step"), (axes[1], "wall_time", "wall s")):
        if soft:
            ax.plot(
                [r[key] for r in soft],
                [r["soft_revenue"] for r in soft],
                color="tab:blue",
                alpha=0.5,
                label="soft revenue (train batches)",
            )
        if hard:
            ax.plot(
                [r[key] for r in hard],
                [r["val_revenue"] for r in hard],
                "o-",
                color="tab:red",
                label="hard revenue (validation)",
            )
        for name, (style, color) in BASELINE_STYLE.items():
            entry = (report.get("baselines") or {}).get(name)
            if entry is not None:
                ax.axhline(
                    entry["revenue"]["mean"],
                    linestyle=style,
                    color=color,
                    linewidth=1.2,
                    label=f"{LABELS[name]} (test)",
                )
        if "revenue" in report:
            ax.axhline(
                report["revenue"]["mean"], color="tab:red", linewidth=2, alpha=0.4,
                label="learned menu (test)",
            )  # fmt: skip
        ax.set_xlabel(label)
        ax.set_ylabel("revenue (user units)")
        ax.grid(alpha=0.3)
    axes[0].set_title("revenue against step")
    axes[1].set_title("revenue against wall time")
    axes[1].legend(fontsize=7, loc="lower right")
    return _png(fig)


def menu_figure(menu: dict) -> bytes:
    """Price against expected bundle size (purchased elements highlighted), purchases per
    element (sorted), and the distribution of lottery sizes."""
    from matplotlib.figure import Figure

    prices, sizes = menu["prices"], menu["expected_bundle_size"]
    counts, lottery = menu["purchases"], menu["lottery_size"]
    fig = Figure(figsize=(15, 4.5))
    ax_price, ax_counts, ax_lottery = fig.subplots(1, 3)
    bought = [j for j, c in enumerate(counts) if c > 0]
    ax_price.scatter(sizes, prices, s=4, color="lightgray", label="all elements")
    if bought:
        total = max(counts)
        ax_price.scatter(
            [sizes[j] for j in bought],
            [prices[j] for j in bought],
            s=[10 + 90 * counts[j] / total for j in bought],
            color="tab:red",
            label="bought on test (size ∝ purchases)",
        )
    ax_price.set_xlabel("expected bundle size Σ α·|S|")
    ax_price.set_ylabel("price (user units)")
    ax_price.set_title("menu: price against bundle size")
    ax_price.legend(fontsize=7)
    ordered = sorted((c for c in counts if c > 0), reverse=True)
    ax_counts.bar(range(1, len(ordered) + 1), ordered, color="tab:red", width=1.0)
    ax_counts.set_xlabel("element rank (bought elements only)")
    ax_counts.set_ylabel("test purchases")
    ax_counts.set_title(f"how often each element is chosen ({len(ordered)} in use)")
    top = max(lottery) if lottery else 1
    bins = [x - 0.5 for x in range(1, top + 2)]
    ax_lottery.hist(lottery, bins=bins, color="lightgray", label="all elements")
    if bought:
        ax_lottery.hist([lottery[j] for j in bought], bins=bins, color="tab:red", label="bought")
    ax_lottery.set_xlabel("distinct bundles in the lottery (α ≥ 1e-3)")
    ax_lottery.set_ylabel("elements")
    ax_lottery.set_title("lottery sizes")
    ax_lottery.legend(fontsize=7)
    return _png(fig)


# --------------------------------------------------------------------------- writing


def write_run_report(run_dir: Path, report: dict, *, main_process: bool = True) -> list[Path]:
    """Write ``report.json``, ``report.md`` and the plots into ``run_dir``; return the paths."""
    if not main_process:
        return []
    run_dir = Path(run_dir)
    known = None if "optimum" in report else _run_known(run_dir)
    if known is not None:  # in place: the summary printed after this shows it too
        report["optimum"] = optimum_record(report, known)
    plots: dict[str, bytes] = {}
    try:
        plots[REVENUE_PNG] = revenue_figure(read_metrics(run_dir / METRICS_FILE), report)
        if "menu" in report:
            plots[MENU_PNG] = menu_figure(report["menu"])
    except ImportError as err:  # the report's numbers matter more than its pictures
        logger.warning("plots skipped ({}); install matplotlib>=3.7", err)
    written = []
    for name, data in plots.items():
        atomic_write_bytes(run_dir / name, data)
        written.append(run_dir / name)
    payload = json_safe({**report, "plots": sorted(plots)})
    atomic_write_bytes(run_dir / REPORT_JSON, (json.dumps(payload, indent=2) + "\n").encode())
    atomic_write_bytes(run_dir / REPORT_MD, markdown(report, sorted(plots)).encode())
    logger.info("report: {} ({})", run_dir / REPORT_MD, ", ".join(sorted(plots)) or "no plots")
    return [run_dir / REPORT_JSON, run_dir / REPORT_MD, *written]
