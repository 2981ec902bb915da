"""`bundleflow suite`: the known-optimum suite — every setting × seeds, one table.

Each (setting, seed) is one `bundleflow train` of the setting's preset (``configs/suite-*.yaml``,
or a YAML path) with ``stage1.seed`` and ``stage2.seed`` set to the seed, run as its own
process (a run's failure, memory or CUDA state never leaks into the next), under
``RUNS/SETTING/seedS/``. The table is read from each run's ``report.json``: the data's optimum,
the best posted price on the test split, the mechanism's test revenue with its paired ratio
to that posted price, and its ratio to the optimum — paired (÷ the optimal mechanism's
payments on the same test valuations) where the optimal mechanism is explicit, else unpaired
(÷ the population optimum), as the cell says. A mechanism (or a posted price) above the
optimum beyond its 95% CI (paired: the CI's lower end above 1) is flagged as an evaluation bug
and makes the command exit 1.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from loguru import logger

from bundleflow.errors import BundleflowError
from bundleflow.evaluation.evaluate import BASELINES, json_safe
from bundleflow.evaluation.report import ABOVE_OPTIMUM, LABELS, REPORT_JSON, pairing
from bundleflow.paths import runs_root
from bundleflow.train.config import CONFIG_DIR, load_config, preset_names

SUITE_PREFIX = "suite-"
"""Presets named ``suite-*`` are the suite's settings."""
DEFAULT_SEEDS = (0, 1, 2)


def register(sub: argparse._SubParsersAction) -> None:
    doc = "train every known-optimum setting with several seeds and print one table"
    p = sub.add_parser("suite", help=doc, description=doc)
    p.add_argument(
        "--settings",
        default=None,
        metavar="A,B,...",
        help="suite presets (specialists-m20 or suite-specialists-m20) or YAML paths; "
        "default: every configs/suite-*.yaml",
    )
    p.add_argument("--seeds", default="0,1,2", metavar="S,S,...", help="training seeds (0,1,2)")
    p.add_argument("--max-steps", type=int, default=None, metavar="N", help="Stage-2 steps cap")
    p.add_argument("--device", default=None, help="auto|cuda|cuda:N|mps|cpu (default: config)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key in every run (repeatable)",
    )
    p.add_argument("--runs-dir", default=None, metavar="DIR", help="where the runs go")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=cmd_suite)


def suite_presets() -> list[str]:
    """The suite's presets, in name order."""
    return [n for n in preset_names() if n.startswith(SUITE_PREFIX)]


def resolve_settings(text: str | None) -> list[str]:
    """``--settings``: names (with or without ``suite-``) or YAML paths; each must load."""
    if text is None:
        names = suite_presets()
        if not names:
            raise BundleflowError(f"no suite-*.yaml presets in {CONFIG_DIR}")
        return names
    out = []
    for item in (s.strip() for s in text.split(",") if s.strip()):
        is_path = item.endswith((".yaml", ".yml"))
        name = item if is_path or item.startswith(SUITE_PREFIX) else SUITE_PREFIX + item
        config = load_config(name)  # an unknown name or bad file: one clear error
        if config.data.kind != "known" and config.data.kind != "additive":
            logger.warning("{}: data.kind {} has no known optimum", item, config.data.kind)
        out.append(name)
    if not out:
        raise BundleflowError("--settings: give at least one setting")
    return out


def _parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise BundleflowError(f"--seeds {text!r}: give integers such as 0,1,2") from None
    if not seeds:
        raise BundleflowError("--seeds: give at least one seed")
    return seeds


def _label(preset: str) -> str:
    return Path(preset).stem.removeprefix(SUITE_PREFIX)


def train_one(preset: str, seed: int, root: Path, args: argparse.Namespace) -> dict:
    """One `bundleflow train` in its own process; its report (or why there is none)."""
    cmd = [sys.executable, "-m", "bundleflow", "train", "--preset", preset]
    cmd += ["--runs-dir", str(root), "--no-progress"]
    cmd += ["--set", f"stage1.seed={seed}", "--set", f"stage2.seed={seed}"]
    for item in args.overrides:
        cmd += ["--set", item]
    if args.max_steps is not None:
        cmd += ["--max-steps", str(args.max_steps)]
    if args.device:
        cmd += ["--device", args.device]
    logger.info("suite: {} seed {} ...", _label(preset), seed)
    started = time.monotonic()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
    sys.stderr.write(proc.stdout)  # the run's summary; stdout stays for the suite's table
    record = {"setting": _label(preset), "preset": preset, "seed": seed}
    record["wall_time"] = time.monotonic() - started
    reports = sorted(root.glob(f"*/{REPORT_JSON}"), key=lambda p: p.stat().st_mtime)
    if proc.returncode != 0 or not reports:
        record["error"] = f"train exited {proc.returncode}" + ("" if reports else ", no report")
        return record
    record["run"] = str(reports[-1].parent)
    return {**record, **summarise(json.loads(reports[-1].read_text()))}


def summarise(report: dict) -> dict:
    """What the suite's table shows of one run's report."""
    best = report.get("best_baseline")
    baselines = report.get("baselines") or {}
    opt = report.get("optimum") or {}
    out = {
        "revenue": report["revenue"],
        "best_posted_price": {"name": best, **(baselines.get(best) or {}).get("revenue", {})},
        "ratio_to_best_posted_price": report.get("ratio_to_best_baseline"),
        "optimum": opt.get("value"),
        "optimum_kind": opt.get("kind"),
        "ratio_to_optimum": opt.get("ratio"),
        "optimum_pairing": pairing(opt) if opt else None,
        "flags": [],
    }
    if opt.get("above_optimum"):
        out["flags"].append(f"menu {ABOVE_OPTIMUM}")
    value = opt.get("value")
    for name in BASELINES:
        if opt.get("paired"):  # the paired ratio's CI to the optimal mechanism's payments
            above = bool(((opt.get("baselines") or {}).get(name) or {}).get("above_optimum"))
        else:
            ci = ((baselines.get(name) or {}).get("revenue") or {}).get("ci95")
            above = value is not None and bool(ci) and ci[0] is not None and ci[0] > value
        if above:
            out["flags"].append(f"{LABELS[name]} {ABOVE_OPTIMUM}")
    return out


def _mean(records: list[dict], pick) -> float | None:
    values = [pick(r) for r in records]
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def setting_means(records: list[dict]) -> dict:
    """Means over a setting's finished seeds."""
    done = [r for r in records if "error" not in r]
    return {
        "setting": records[0]["setting"],
        "seeds": len(done),
        "optimum": _mean(done, lambda r: r["optimum"]),
        "best_posted_price": _mean(done, lambda r: r["best_posted_price"].get("mean")),
        "revenue": _mean(done, lambda r: r["revenue"]["mean"]),
        "ratio_to_best_posted_price": _mean(
            done, lambda r: (r["ratio_to_best_posted_price"] or {}).get("ratio")
        ),
        "ratio_to_optimum": _mean(done, lambda r: (r["ratio_to_optimum"] or {}).get("ratio")),
        "flags": sorted({f for r in done for f in r["flags"]}),
    }


def _f(x: float | None, digits: int = 5) -> str:
    return "" if x is None else f"{x:.{digits}g}"


def _ci(entry: dict | None, key: str, digits: int) -> str:
    if not entry or entry.get(key) is None:
        return ""
    ci = entry.get("ci95") or [None, None]
    return f"{_f(entry[key], digits)} [{_f(ci[0], digits)}, {_f(ci[1], digits)}]"


def format_table(records: list[dict], means: list[dict]) -> str:
    """One table: a row per (setting, seed), then a row per setting with the seeds' means."""
    head = ["setting", "seed", "optimum", "best posted price", "ours [95% CI]",
            "÷ best posted [paired 95% CI]", "÷ optimum [95% CI] (pairing)", "flag"]  # fmt: skip
    body = []
    for r in records:
        if "error" in r:
            body.append([r["setting"], str(r["seed"]), "", "", r["error"], "", "", "FAILED"])
            continue
        best = r["best_posted_price"]
        body.append(
            [
                r["setting"],
                str(r["seed"]),
                _f(r["optimum"]),
                f"{_f(best.get('mean'))} ({LABELS.get(best['name'], best['name'])})",
                _ci(r["revenue"], "mean", 5),
                _ci(r["ratio_to_best_posted_price"], "ratio", 4),
                _ci(r["ratio_to_optimum"], "ratio", 4)
                + (f" ({r['optimum_pairing']})" if r.get("ratio_to_optimum") else ""),
                "; ".join(r["flags"]),
            ]
        )
    for m in means:
        body.append(
            [
                m["setting"],
                f"mean of {m['seeds']}",
                _f(m["optimum"]),
                _f(m["best_posted_price"]),
                _f(m["revenue"]),
                _f(m["ratio_to_best_posted_price"], 4),
                _f(m["ratio_to_optimum"], 4),
                "; ".join(m["flags"]),
            ]
        )
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [head, *body]
    )


def cmd_suite(args: argparse.Namespace) -> int:
    presets = resolve_settings(args.settings)
    seeds = _parse_seeds(args.seeds)
    if args.max_steps is not None and args.max_steps < 1:
        raise BundleflowError(f"--max-steps {args.max_steps}: give at least 1 step")
    root = runs_root(args.runs_dir) / time.strftime("suite-%Y%m%d-%H%M%S")
    records = [train_one(p, s, root / _label(p) / f"seed{s}", args) for p in presets for s in seeds]
    means = [setting_means([r for r in records if r["preset"] == p]) for p in presets]
    bad = any("error" in r or r["flags"] for r in records)
    if args.json:
        out = {"runs_dir": str(root), "runs": records, "settings": means, "ok": not bad}
        sys.stdout.write(json.dumps(json_safe(out), allow_nan=False) + "\n")
    else:
        sys.stdout.write(format_table(records, means) + "\n")
    logger.info("suite: runs in {}", root)
    return 1 if bad else 0
