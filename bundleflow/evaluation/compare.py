"""`bundleflow compare`'s output: the runs table with one line per group of runs that differ
only by seeds, the JSON object, the CSV rows and the plot of test revenue against wall time.

:func:`compare` is what the command calls; the runs come from
:mod:`bundleflow.evaluation.run_groups`, which reads them without recomputing anything.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from loguru import logger

from bundleflow.errors import BundleflowError
from bundleflow.evaluation.report import ABOVE_OPTIMUM, LABELS
from bundleflow.evaluation.run_groups import (
    DONE,
    INCOMPLETE,
    SEED_KEYS,
    RunLayout,
    expand_runs,
    group_runs,
    read_run,
)

SHOWN_SEEDS = ("data.seed", "stage1.seed", "stage2.seed")
"""The seeds the text table shows (eval.seed joins them when it varies among the runs)."""
LOG_X_SPAN = 30.0
"""The plot's wall-time axis is logarithmic when the longest run is this many times the
shortest."""

CSV_COLUMNS = (
    "index",
    "run",
    "path",
    "state",
    "group",
    "preset",
    "overrides",
    "data_seed",
    "stage1_seed",
    "stage2_seed",
    "eval_seed",
    "mechanism",
    "revenue",
    "revenue_ci_low",
    "revenue_ci_high",
    "n_test",
    "best_baseline",
    "ratio",
    "ratio_ci_low",
    "ratio_ci_high",
    "wall_time_s",
    "device",
    "data",
    "max_steps",
    "max_time",
    "optimum",
    "ratio_to_optimum",
    "ratio_to_optimum_ci_low",
    "ratio_to_optimum_ci_high",
)


def compare(
    patterns: list[str],
    layout: RunLayout,
    *,
    as_json: bool = False,
    csv_file: str | None = None,
    plot_file: str | None = None,
) -> str:
    """What `bundleflow compare` prints for the runs ``patterns`` name (paths or globs): one
    JSON object (``as_json``), the CSV rows (``csv_file`` ``-``) or the table. On the way it
    writes the plot to ``plot_file`` and the CSV rows to ``csv_file`` (a path)."""
    read = [read_run(path, layout) for path in expand_runs(patterns, layout)]
    records = [record for record, _ in read]
    groups = group_runs(records, [key for _, key in read])
    if plot_file:
        try:
            png = plot_png(records, groups)
        except ImportError as err:
            raise BundleflowError(
                f"--plot needs matplotlib ({err}); pip install matplotlib"
            ) from None
        _write_file(plot_file, png)
    if csv_file and csv_file != "-":
        _write_file(csv_file, csv_text(records).encode())
    if as_json:
        payload = {"runs": records, "groups": groups, "seed_keys": list(SEED_KEYS)}
        return json.dumps(payload) + "\n"
    if csv_file == "-":
        return csv_text(records)
    return format_text(records, groups) + "\n"


# --------------------------------------------------------------------------- output


def budgets_text(record: dict) -> str:
    """The run's ``--max-steps`` / ``--max-time`` (``none``: the config's whole schedule)."""
    flags = record["flags"]
    parts = [f"{flags['max_steps']} steps"] if flags.get("max_steps") else []
    parts += [f"{flags['max_time']:g} s"] if flags.get("max_time") else []
    return ", ".join(parts) or "none"


def _optimum_cells(record: dict) -> list[str]:
    opt = record["optimum"]
    if opt is None:
        return ["", ""]
    text = _with_ci(opt["ratio"], opt["ci95"], 4)
    if opt["ratio"] is not None:
        text += " paired" if opt.get("paired") else " unpaired"
    return [_fmt(opt["value"]), text + (f" {ABOVE_OPTIMUM}" if opt["above_optimum"] else "")]


def _fmt(x: float | None, digits: int = 5) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}g}"


def _with_ci(value: float | None, ci: list | None, digits: int = 5) -> str:
    if value is None:
        return ""
    if not ci:
        return _fmt(value, digits)
    return f"{_fmt(value, digits)} [{_fmt(ci[0], digits)}, {_fmt(ci[1], digits)}]"


def _seeds_text(record: dict, shown: tuple[str, ...]) -> str:
    return "/".join(str(record["seeds"][key.split(".")[0]]) for key in shown)


def _state_text(record: dict) -> str:
    progress = record["progress"]
    if record["state"] == DONE or not progress:
        return record["state"]
    return f"{record['state']} (stage {progress['stage']}, step {progress['step']})"


def _table(head: list[str], body: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [head, *body]
    )


def shown_seeds(records: list[dict]) -> tuple[str, ...]:
    varies = len({r["seeds"]["eval"] for r in records}) > 1
    return (*SHOWN_SEEDS, "eval.seed") if varies else SHOWN_SEEDS


def format_text(records: list[dict], groups: list[dict]) -> str:
    """The runs table, then one line per group of two or more runs."""
    shown = shown_seeds(records)
    seed_head = "seeds " + "/".join(k.split(".")[0].replace("stage", "s") for k in shown)
    head = [
        "#", "run", "state", "group", "preset", "overrides", "data", "budgets", seed_head,
        "test revenue [95% CI]", "÷ best baseline [paired 95% CI]", "best baseline",
        "wall s", "device",
    ]  # fmt: skip
    body = [_run_cells(i, r, shown) for i, r in enumerate(records, 1)]
    if any(r["optimum"] for r in records):  # data with a known optimum
        head += ["optimum", "÷ optimum [95% CI]"]
        for row, r in zip(body, records, strict=True):
            row += _optimum_cells(r)
    lines = [_table(head, body)]
    if any(r["state"] == INCOMPLETE for r in records):
        lines.append(
            "incomplete: no report yet (still training, stopped or killed); "
            "`bundleflow train --resume RUN_DIR` continues a stopped run"
        )
    return "\n".join(lines + _groups_lines(groups))


def _run_cells(index: int, r: dict, shown: tuple[str, ...]) -> list[str]:
    """Run ``r``'s row of the text table, numbered ``index`` (the optimum's cells apart)."""
    revenue, ratio = r["revenue"] or {}, r["ratio"] or {}
    return [
        str(index),
        r["run"],
        _state_text(r),
        str(r["group"]),
        str(r["preset"]),
        " ".join(r["overrides"]),
        r["data_spec"],
        budgets_text(r),
        _seeds_text(r, shown),
        _with_ci(revenue.get("mean"), revenue.get("ci95")),
        _with_ci(ratio.get("ratio"), ratio.get("ci95"), 4),
        LABELS.get(r["best_baseline"], r["best_baseline"] or ""),
        "" if r["wall_time"] is None else f"{r['wall_time']:.1f}",
        str(r["device"] or ""),
    ]


def _groups_lines(groups: list[dict]) -> list[str]:
    """The groups table below the runs table: a blank line, a title and one row per group of
    two or more runs; nothing when every group holds one run."""
    several = [g for g in groups if len(g["runs"]) > 1]
    if not several:
        return []
    head = [
        "group", "runs", "setting", "test revenue: mean", "min–max", "std",
        "÷ best: mean", "min–max", "std",
    ]  # fmt: skip
    return [
        "",
        "groups of runs that differ only by seeds (std: sample standard deviation):",
        _table(head, [_group_row(g) for g in several]),
    ]


def _group_row(g: dict) -> list[str]:
    def cells(s: dict | None, digits: int) -> list[str]:
        if s is None:
            return ["n/a", "", ""]
        return [
            _fmt(s["mean"], digits),
            f"{_fmt(s['min'], digits)}–{_fmt(s['max'], digits)}",
            _fmt(s["std"], 3) if s["std"] is not None else "n/a",
        ]

    runs = (
        f"{g['finished']} of {len(g['runs'])}"
        if g["finished"] < len(g["runs"])
        else str(len(g["runs"]))
    )
    return [str(g["group"]), runs, g["setting"], *cells(g["revenue"], 5), *cells(g["ratio"], 4)]


def csv_text(records: list[dict]) -> str:
    """One row per run, ``CSV_COLUMNS``; empty cells for what a run does not have."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for i, r in enumerate(records, 1):
        revenue, ratio = r["revenue"] or {}, r["ratio"] or {}
        rev_ci, ratio_ci = revenue.get("ci95") or [None, None], ratio.get("ci95") or [None, None]
        row = [
            i, r["run"], r["path"], r["state"], r["group"], r["preset"], " ".join(r["overrides"]),
            r["seeds"]["data"], r["seeds"]["stage1"], r["seeds"]["stage2"], r["seeds"]["eval"],
            r["mechanism"], revenue.get("mean"), rev_ci[0], rev_ci[1], revenue.get("n"),
            r["best_baseline"], ratio.get("ratio"), ratio_ci[0], ratio_ci[1], r["wall_time"],
            r["device"], r["data_spec"], r["flags"].get("max_steps"), r["flags"].get("max_time"),
        ]  # fmt: skip
        opt = r["optimum"] or {}
        row += [opt.get("value"), opt.get("ratio"), *(opt.get("ci95") or [None, None])]
        writer.writerow(["" if v is None else v for v in row])
    return buffer.getvalue()


def plot_png(records: list[dict], groups: list[dict]) -> bytes:
    """Test revenue (with its 95% CI) against wall time, one colour per group, each point
    numbered as in the table."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    plotted = [(i, r) for i, r in enumerate(records, 1) if r["state"] == DONE and r["wall_time"]]
    for g in groups:
        points = [(i, r) for i, r in plotted if r["group"] == g["group"]]
        if not points:
            continue
        xs = [r["wall_time"] for _, r in points]
        ys = [r["revenue"]["mean"] for _, r in points]
        cis = [r["revenue"]["ci95"] or [y, y] for (_, r), y in zip(points, ys, strict=True)]
        yerr = [[y - ci[0] for y, ci in zip(ys, cis, strict=True)],
                [ci[1] - y for y, ci in zip(ys, cis, strict=True)]]  # fmt: skip
        ax.errorbar(
            xs, ys, yerr=yerr, fmt="o", capsize=3,
            label=f"group {g['group']}: {g['setting']} ({len(points)})",
        )  # fmt: skip
        for (i, _), x, y in zip(points, xs, ys, strict=True):
            ax.annotate(f"#{i}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if plotted:
        times = [r["wall_time"] for _, r in plotted]
        if min(times) > 0 and max(times) / min(times) > LOG_X_SPAN:
            ax.set_xscale("log")
        ax.legend(fontsize=7, loc="best")
    else:
        ax.text(0.5, 0.5, "no finished runs", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("wall time of the run (s)")
    ax.set_ylabel("test revenue, learned menu (hard; 95% CI)")
    ax.set_title(f"test revenue against wall time ({len(plotted)} of {len(records)} runs)")
    ax.grid(alpha=0.3)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def _write_file(path: str, data: bytes) -> None:
    target = Path(path).expanduser()
    try:
        target.write_bytes(data)
    except OSError as err:
        raise BundleflowError(
            f"{path}: cannot write ({err.strerror or err}); check that its directory exists "
            "and is writable"
        ) from None
    logger.info("wrote {}", target)
