"""`bundleflow compare RUN_DIR...`: finished (and unfinished) runs side by side.

Reads what each run directory already holds — ``run.json`` (the launch record: preset,
``--set`` overrides, flags; the device), ``config.yaml`` (the resolved config: seeds) and
``report.json`` (test revenue and the paired ratio to the best baseline, with their CIs) —
and recomputes nothing. Runs whose resolved configs differ only by seeds form a group; each
group gets the mean and spread of its revenues and ratios.
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import math
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import yaml
from loguru import logger

from bundleflow.errors import BundleflowError
from bundleflow.evaluation.report import ABOVE_OPTIMUM, LABELS, REPORT_JSON
from bundleflow.paths import runs_root
from bundleflow.train.config import Config, to_flat_dict
from bundleflow.train.run import CONFIG_FILE, METRICS_FILE, RUN_INFO

SEED_KEYS = ("data.seed", "stage1.seed", "stage2.seed", "eval.seed")
"""Config keys that only reseed a run: runs that differ in these alone form one group."""
SHOWN_SEEDS = ("data.seed", "stage1.seed", "stage2.seed")
"""The seeds the text table shows (eval.seed joins them when it varies among the runs)."""
NOT_EXPERIMENT = (
    "name",
    "device",
    "stage1.log_every",
    "stage1.checkpoint_every",
    "stage2.log_every",
    "stage2.checkpoint_every",
    "stage2.keep_checkpoints",
    "eval.batch_size",
)
"""Config keys left out of the group key: the preset's label, the requested device (the
device the run actually used is part of the key instead), and what only changes logging,
checkpoints or evaluation batches, not the trained menu."""
LAUNCH_KEYS = ("command", "max_steps", "max_time", "data_sha256", "flow_ckpt")
"""Launch flags that change what is trained although they are not in the config."""
METRICS_TAIL_BYTES = 65536
"""How much of the end of ``metrics.jsonl`` is read to find an unfinished run's last step."""
LOG_X_SPAN = 30.0
"""The plot's wall-time axis is logarithmic when the longest run is this many times the
shortest."""

DONE = "done"
INCOMPLETE = "incomplete"
STAGE1_ONLY = "stage-1 only"

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


def register(sub: argparse._SubParsersAction) -> None:
    doc = "put runs side by side: settings, seeds, test revenue, ratio to the best baseline"
    p = sub.add_parser(
        "compare",
        help=doc,
        description=doc + "; runs whose configs differ only by seeds form a group with the "
        "mean, min-max and standard deviation of its revenues and ratios. Reads run.json, "
        "config.yaml and report.json; recomputes nothing.",
    )
    p.add_argument(
        "runs",
        nargs="+",
        metavar="RUN_DIR",
        help="run directories or glob patterns (quoted or not), e.g. 'runs/default-*'",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--csv", metavar="FILE", help="write one CSV row per run to FILE ('-': stdout)")
    p.add_argument("--plot", metavar="FILE.png", help="write test revenue against wall time")
    p.set_defaults(func=cmd_compare)


# --------------------------------------------------------------------------- finding runs


def _has_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and ((path / RUN_INFO).is_file() or (path / CONFIG_FILE).is_file())


def _runs_hint() -> str:
    """Where the runs are (the hint `evaluate` and `menu show` give too)."""
    root = runs_root()
    return f"`ls {root}` lists the runs" if root.is_dir() else f"no runs in {root} yet"


def _not_a_run(path: Path) -> BundleflowError:
    runs = _runs_hint()
    if not path.exists():
        return BundleflowError(f"{path}: no such run directory; {runs}")
    if not path.is_dir():
        return BundleflowError(f"{path}: a file, not a run directory; {runs}")
    inner = sorted(p.name for p in path.iterdir() if is_run_dir(p))
    if inner:  # a folder of runs (--runs-dir, the runs root): say which glob selects them
        runs = f"it holds {len(inner)} run directories: pass '{path / '*'}'"
    return BundleflowError(f"{path}: not a bundleflow run directory (no {RUN_INFO}); {runs}")


def expand_runs(patterns: list[str]) -> list[Path]:
    """Run directories named by ``patterns`` (paths or glob patterns, expanded here so that a
    quoted pattern works), in the order given, each glob's matches sorted, duplicates once.
    A pattern that matches nothing or names something that is not a run is an error."""
    found: list[Path] = []
    seen: set[Path] = set()
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        if _has_glob(expanded):
            matches = sorted(glob.glob(expanded))
            if not matches:
                raise BundleflowError(f"{pattern}: matches nothing; {_runs_hint()}")
            paths = [Path(m) for m in matches]
        else:
            paths = [Path(expanded)]
        for path in paths:
            if not is_run_dir(path):
                raise _not_a_run(path)
            key = path.resolve()
            if key not in seen:
                seen.add(key)
                found.append(path)
    return found


# --------------------------------------------------------------------------- reading one run


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise BundleflowError(f"{path}: unreadable ({err}); the run is damaged") from None


def _read_config(run_dir: Path, info: dict) -> dict:
    """The resolved config as a plain dict: ``config.yaml``, else the copy in ``run.json``.
    Read as YAML, not through the schema, so runs of older versions still compare."""
    path = run_dir / CONFIG_FILE
    if path.is_file():
        try:
            config = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as err:
            raise BundleflowError(f"{path}: unreadable ({err}); the run is damaged") from None
    else:
        config = info.get("config")
    if not isinstance(config, dict):
        raise BundleflowError(f"{path}: not a config mapping; the run is damaged")
    return config


def flatten(node: dict, prefix: str = "") -> dict[str, Any]:
    """``{"stage2": {"seed": 0}}`` -> ``{"stage2.seed": 0}`` (the keys ``--set`` takes)."""
    flat: dict[str, Any] = {}
    for key, value in node.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def last_metrics(path: Path) -> dict | None:
    """The last complete record of ``metrics.jsonl`` (only its tail is read; a torn last line
    is skipped), or None."""
    if not path.is_file():
        return None
    with path.open("rb") as handle:
        handle.seek(0, os.SEEK_END)
        handle.seek(max(0, handle.tell() - METRICS_TAIL_BYTES))
        tail = handle.read().decode("utf-8", errors="replace")
    for line in reversed(tail.splitlines()):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            return record
    return None


def data_spec(flat: dict, data_file: str | None) -> str:
    """What a run trained on, in a few words: the ``--data`` file's name, else the generated
    set (CATS distribution and values, m, samples) or the additive setting."""
    if data_file:
        return Path(data_file).name
    kind, m = flat.get("data.kind", "cats"), flat.get("data.n_items")
    if kind == "file":
        return Path(str(flat.get("data.path"))).name
    if kind == "additive":
        return f"additive m={m}"
    if kind == "known":
        return f"known {flat.get('data.setting')} m={m} n={flat.get('data.n_samples')}"
    return (
        f"{kind} {flat.get('data.dist')}-{flat.get('data.values')} m={m} "
        f"n={flat.get('data.n_samples')}"
    )


def budgets_text(record: dict) -> str:
    """The run's ``--max-steps`` / ``--max-time`` (``none``: the config's whole schedule)."""
    flags = record["flags"]
    parts = [f"{flags['max_steps']} steps"] if flags.get("max_steps") else []
    parts += [f"{flags['max_time']:g} s"] if flags.get("max_time") else []
    return ", ".join(parts) or "none"


def _device_type(device: str | None) -> str | None:
    return None if device is None else device.split(":")[0]


def read_run(run_dir: Path) -> tuple[dict, str]:
    """One run as a flat record (the JSON's ``runs``): settings, seeds, state, and the
    report's figures when there is a report; and its group key (the resolved config without
    seeds, the launch flags that change training, the device type)."""
    info = _read_json(run_dir / RUN_INFO) if (run_dir / RUN_INFO).is_file() else {}
    if not isinstance(info, dict):
        raise BundleflowError(f"{run_dir / RUN_INFO}: not a JSON object; the run is damaged")
    flat = flatten(_read_config(run_dir, info))
    launch = info.get("launch") or {}
    report = _read_json(run_dir / REPORT_JSON) if (run_dir / REPORT_JSON).is_file() else None
    record: dict[str, Any] = {
        "run": run_dir.name,
        "path": str(run_dir),
        "state": INCOMPLETE,
        "progress": None,
        "preset": launch.get("preset") or flat.get("name"),
        "overrides": list(launch.get("set") or []),
        "flags": {k: launch[k] for k in ("max_steps", "max_time", "flow_ckpt") if launch.get(k)},
        "data": launch.get("data"),
        "data_spec": data_spec(flat, launch.get("data")),
        "seeds": {key.split(".")[0]: flat.get(key) for key in SEED_KEYS},
        "mechanism": None,
        "revenue": None,
        "best_baseline": None,
        "ratio": None,
        "optimum": None,
        "wall_time": None,
        "device": info.get("device"),
        "created": info.get("created"),
    }
    if isinstance(report, dict) and isinstance(report.get("revenue"), dict):
        ratio = report.get("ratio_to_best_baseline")
        record.update(
            state=DONE,
            mechanism="menu_fallback" if "fallback" in report else "menu",
            revenue={k: report["revenue"].get(k) for k in ("mean", "ci95", "n")},
            best_baseline=report.get("best_baseline"),
            ratio={k: ratio.get(k) for k in ("ratio", "ci95")} if ratio else None,
            optimum=optimum_summary(report.get("optimum")),
            wall_time=report.get("wall_time"),
            device=report.get("device_name") or report.get("device") or record["device"],
        )
    else:
        if launch.get("command") == "train-stage1":
            record["state"] = STAGE1_ONLY
        last = last_metrics(run_dir / METRICS_FILE)
        if last is not None:
            record["progress"] = {"stage": last.get("stage"), "step": last.get("step")}
    # A key the run's config lacks (a run of an older version) has the current default, as
    # when `--resume` loads that config.
    resolved = {**to_flat_dict(Config()), **flat}
    experiment = {
        k: v for k, v in resolved.items() if k not in SEED_KEYS and k not in NOT_EXPERIMENT
    }
    experiment.update({f"launch.{k}": launch.get(k) for k in LAUNCH_KEYS})
    experiment["device_type"] = _device_type(info.get("device"))
    return record, json.dumps(experiment, sort_keys=True, default=str)


def optimum_summary(optimum: dict | None) -> dict | None:
    """A report's known optimum: its value and the run's ratio to it with the 95% CI, and
    whether the run is above it beyond that CI (an evaluation bug)."""
    if not isinstance(optimum, dict) or "value" not in optimum:
        return None
    ratio = optimum.get("ratio") or {}
    return {
        "value": optimum["value"],
        "ratio": ratio.get("ratio"),
        "ci95": ratio.get("ci95"),
        "paired": bool(optimum.get("paired")),
        "above_optimum": bool(optimum.get("above_optimum")),
    }


def _optimum_cells(record: dict) -> list[str]:
    opt = record["optimum"]
    if opt is None:
        return ["", ""]
    text = _with_ci(opt["ratio"], opt["ci95"], 4)
    if opt["ratio"] is not None:
        text += " paired" if opt.get("paired") else " unpaired"
    return [_fmt(opt["value"]), text + (f" {ABOVE_OPTIMUM}" if opt["above_optimum"] else "")]


# --------------------------------------------------------------------------- groups


def _seed_override(item: str) -> bool:
    return item.split("=", 1)[0].strip() in SEED_KEYS


def setting_label(record: dict) -> str:
    """The preset, the non-seed ``--set`` overrides and flags: what the group's runs share."""
    parts = [str(record["preset"])]
    parts += [f"--set {item}" for item in record["overrides"] if not _seed_override(item)]
    if record["data"]:
        parts.append(f"--data {Path(record['data']).name}")
    parts += [f"--{k.replace('_', '-')} {v}" for k, v in record["flags"].items()]
    return " ".join(parts)


def spread(values: list[float]) -> dict | None:
    """Mean, min, max and sample standard deviation (None for a single value)."""
    if not values:
        return None
    return {
        "mean": statistics.fmean(values),
        "min": min(values),
        "max": max(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "n": len(values),
    }


def group_runs(records: list[dict], keys: list[str]) -> list[dict]:
    """Runs with equal keys form a group: numbered from 1 in order of first appearance (set
    as ``record["group"]``), each summarised over its finished runs."""
    numbers: dict[str, int] = {}
    for record, key in zip(records, keys, strict=True):
        record["group"] = numbers.setdefault(key, len(numbers) + 1)
    groups = []
    for key, number in numbers.items():
        members = [r for r in records if r["group"] == number]
        done = [r for r in members if r["state"] == DONE]
        labels = list(dict.fromkeys(setting_label(r) for r in members))
        varying = sorted(
            k for k in SEED_KEYS if len({r["seeds"][k.split(".")[0]] for r in members}) > 1
        )
        groups.append(
            {
                "group": number,
                "setting": " | ".join(labels),
                "runs": [r["run"] for r in members],
                "finished": len(done),
                "seeds_varied": varying,
                "revenue": spread([r["revenue"]["mean"] for r in done]),
                "ratio": spread([r["ratio"]["ratio"] for r in done if r["ratio"]]),
                "ratio_to_optimum": spread(
                    [r["optimum"]["ratio"] for r in done if r["optimum"] and r["optimum"]["ratio"]]
                ),
                "_key": key,
            }
        )
    _tell_apart(groups)
    return groups


def _tell_apart(groups: list[dict]) -> None:
    """Groups whose labels read the same (their runs differ in a setting the launch record
    does not show: the device, a preset file edited between runs) get the differing keys
    appended to their ``setting``."""
    by_label: dict[str, list[dict]] = {}
    for g in groups:
        by_label.setdefault(g["setting"], []).append(g)
    for same in by_label.values():
        keys = [json.loads(g["_key"]) for g in same]
        differ = sorted(
            k for k in set().union(*keys) if len({json.dumps(d.get(k)) for d in keys}) > 1
        )
        for g, key in zip(same, keys, strict=True):
            if differ:
                g["setting"] += " [" + ", ".join(f"{k}={key.get(k)}" for k in differ) + "]"
    for g in groups:
        del g["_key"]


# --------------------------------------------------------------------------- output


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
    body = []
    for i, r in enumerate(records, 1):
        revenue, ratio = r["revenue"] or {}, r["ratio"] or {}
        body.append(
            [
                str(i),
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
        )
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
    several = [g for g in groups if len(g["runs"]) > 1]
    if several:
        lines += [
            "",
            "groups of runs that differ only by seeds (std: sample standard deviation):",
            _table(
                [
                    "group",
                    "runs",
                    "setting",
                    "test revenue: mean",
                    "min–max",
                    "std",
                    "÷ best: mean",
                    "min–max",
                    "std",
                ],  # fmt: skip
                [_group_row(g) for g in several],
            ),
        ]
    return "\n".join(lines)


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


def cmd_compare(args: argparse.Namespace) -> int:
    if args.json and args.csv == "-":
        raise BundleflowError("--json and --csv - both print on stdout; give one of them")
    read = [read_run(path) for path in expand_runs(args.runs)]
    records = [record for record, _ in read]
    groups = group_runs(records, [key for _, key in read])
    if args.plot:
        try:
            png = plot_png(records, groups)
        except ImportError as err:
            raise BundleflowError(
                f"--plot needs matplotlib ({err}); pip install matplotlib"
            ) from None
        _write_file(args.plot, png)
    if args.csv and args.csv != "-":
        _write_file(args.csv, csv_text(records).encode())
    if args.json:
        payload = {"runs": records, "groups": groups, "seed_keys": list(SEED_KEYS)}
        sys.stdout.write(json.dumps(payload) + "\n")
    elif args.csv == "-":
        sys.stdout.write(csv_text(records))
    else:
        sys.stdout.write(format_text(records, groups) + "\n")
    return 0
