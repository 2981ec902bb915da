"""One Markdown row per raw benchmark output: file, command, machine, date, headline figure,
size and sha256 — the summary kept in git instead of the raw files.

    python scripts/summarise_results.py                       # benchmarks/results/raw -> SUMMARY.md
    python scripts/summarise_results.py RAW_DIR --out FILE    # any directory of raw outputs

Raw files are named ``DATE-MACHINE-WHAT.EXT`` (``2026-11-26-h200-bench-m50-bf16.json``); the
date and machine come from the name, the headline figure from the content (bench, report,
metrics, run record, pytest and training logs, ...), the command from the file itself where
it records one (``run.json``, ``data generate --json``, a ``$ COMMAND`` line in a log), else
from ``COMMANDS`` below (taken from BENCHMARKS.md and the session scripts that were in
benchmarks/ until issue 26: ``git show d5c2caa:benchmarks/NAME``).
When you add raw outputs, put them in ``benchmarks/results/raw/`` (ignored by git), add their
command to ``COMMANDS`` unless the file records it, and run this script again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DEFAULT_RAW = RESULTS / "raw"
DEFAULT_OUT = RESULTS / "SUMMARY.md"
LAST_COMMIT_WITH_RAW = "19565fa"
"""A commit whose tree still holds every raw file summarised in the shipped SUMMARY.md:
``git show 19565fa:benchmarks/results/NAME`` restores one."""

NAME = re.compile(r"(?P<date>\d{4}-\d{2}-\d{2})-(?P<machine>cpu2|h100|h200-x2|h200)-(?P<what>.+)")
MACHINES = {
    "cpu2": "2-core AMD EPYC sandbox (CPU)",
    "h100": "NVIDIA H100 80GB HBM3",
    "h200": "NVIDIA H200",
    "h200-x2": "2× NVIDIA H200, one host",
}
TORCH_VERSION = re.compile(r"\b2\.\d+\.\d+\+(?:cu\d+|cpu)\b")

_BENCH = "python3 -m bundleflow bench"
_TRAIN = "python3 -m bundleflow train"
_PYTEST_GPU = "python3 -m pytest -q -m gpu -p no:cacheprovider tests/"
COMMANDS: list[tuple[str, str, str]] = [
    # (regular expression on the file name, command — {1}, {2} are the expression's groups,
    #  where the command comes from)
    (r"2026-11-25-cpu2-bench-m50\.json",
     ".venv/bin/python -m bundleflow bench --device cpu --json --target-ms 250", "BENCHMARKS.md"),
    (r"2026-11-25-cpu2-bench-m50-compile\.json",
     ".venv/bin/python -m bundleflow bench --device cpu --compile --steps 20 --json",
     "BENCHMARKS.md"),
    (r"2026-11-25-(?:cpu2|h100)-core-m(\d+)(?:-run2)?\.json",
     "python scripts/bench_core.py at m={1} (the script was replaced since by bundleflow bench)",
     "BENCHMARKS.md"),
    (r"2026-11-25-h100-bench-m50\.json", f"{_BENCH} --device cuda --json --target-ms 1.0",
     "BENCHMARKS.md"),
    (r"2026-11-25-h100-bench-m500\.json",
     f"{_BENCH} --device cuda --json --items 500 --target-ms 2.0", "BENCHMARKS.md"),
    (r"2026-11-25-h100-bench-m500-J20000-B512\.json",
     f"{_BENCH} --device cuda --json --items 500 --menu 20000 --batch 512 --steps 10",
     "BENCHMARKS.md"),
    (r"2026-11-25-h100-bench-m50-tf32\.json",
     f"{_BENCH} --device cuda --json --tf32 --target-ms 1.0", "BENCHMARKS.md"),
    (r"2026-11-25-h100-bench-m500-tf32\.json",
     f"{_BENCH} --device cuda --json --items 500 --tf32 --target-ms 2.0", "BENCHMARKS.md"),
    (r"2026-11-25-h100-bench-m50-eager\.json", f"{_BENCH} --device cuda --json --eager",
     "BENCHMARKS.md"),
    (r"2026-11-25-h100-bench-stderr\.log",
     f"{_BENCH} --device cuda --json ... (stderr and exit codes of the six bench lines)",
     "BENCHMARKS.md"),
    (r"2026-11-25-h100-default-(eager|graph)\.log",
     f"{_TRAIN} --preset default --device cuda --set stage2.step_mode={{1}}", "BENCHMARKS.md"),
    (r"2026-11-25-h100-paper-m50-(?:metrics\.jsonl|report\.json|run\.json)",
     f"{_TRAIN} --preset paper-m50 --no-progress --max-time 420", "BENCHMARKS.md"),
    (r"2026-11-25-h100-paper-m50-released-flow.*",
     "python3 -m bundleflow train-stage2 --preset paper-m50 --no-progress --flow-ckpt "
     "flow_50.pth", "BENCHMARKS.md"),
    (r"2026-11-25-h100-paper-m50-stage1-60k.*",
     f"{_TRAIN} --preset paper-m50 --no-progress --set stage1.steps=60000", "BENCHMARKS.md"),
    (r"2026-11-25-h200-default-1000steps\.log", f"{_TRAIN} --preset default --max-steps 1000",
     "inferred from the log (1000 steps, stop reason max-steps)"),
    (r"2026-11-25-.*gpu-tests.*\.log", "python3 -m pytest -q -m gpu", "BENCHMARKS.md"),
    (r"2026-11-26-h100-gpu-tests.*\.log", _PYTEST_GPU, "benchmarks/gpu_kernels_session.sh a"),
    (r"2026-11-26-h200-gpu-tests\.log", _PYTEST_GPU, "benchmarks/h100_session.sh a"),
    (r"2026-11-26-h200-x2-gpu-tests\.log", "python3 -m pytest -q -m gpu", "BENCHMARKS.md"),
    (r"2026-11-26-cpu2-additive-m1\.log",
     "bundleflow train --preset additive-m2 --set data.n_items=1 --no-progress",
     "BENCHMARKS.md"),
    (r"2026-11-26-cpu2-stage1-(constant|cosine)-lr\.json",
     "python scripts/stage1_quality.py {1}", "BENCHMARKS.md"),
    (r"2026-11-26-cpu2-stage2-J500-(constant|cosine)-flow\.log",
     "bundleflow train --preset paper-m50 --device cpu --set menu.size=500 --set "
     "stage2.steps=2000 --set stage2.price_lr=0.01 --set stage2.inv_temp.initial=10.0 --set "
     "stage2.inv_temp.interval=20 --set stage2.inv_temp.reset_interval=40 --set "
     "stage1.lr_schedule={1}", "BENCHMARKS.md"),
    (r"2026-11-26-h100-bench-m(50|500)-bf16-compiled(?:-run2)?\.json",
     f"{_BENCH} --items {{1}} --precision bf16 --steps 100 --json",
     "benchmarks/gpu_kernels_session.sh a"),
    (r"2026-11-26-h100-bench-m500-J20000-B512-bf16-compiled\.json",
     f"{_BENCH} --items 500 --menu 20000 --batch 512 --precision bf16 --steps 20 --json",
     "benchmarks/gpu_kernels_session.sh a"),
    (r"2026-11-26-h100-kernels-gpu\.txt",
     "nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; torch, CUDA and "
     "Triton versions", "benchmarks/gpu_kernels_session.sh"),
    (r"2026-11-26-h100-kernels-m(\d+)_(bf16|fp32)\.jsonl",
     "python3 scripts/bench_kernels.py --items {1} --precision {2} --steps 100",
     "benchmarks/gpu_kernels_session.sh a"),
    (r"2026-11-26-h100-paper-m50-flow-(constant|cosine)-seed(\d)-.*",
     f"{_TRAIN} --preset paper-m50 --no-progress --set stage2.seed={{2}} "
     "--set stage1.lr_schedule={1}", "benchmarks/gpu_kernels_session.sh b"),
    (r"2026-11-26-h100-paper-m50-stage2-(compiled|plain)[-.].*",
     f"{_TRAIN} --preset paper-m50 --no-progress --set stage2.kernels={{1}}",
     "benchmarks/gpu_kernels_session.sh b"),
    (r"2026-11-26-h100-profile-m500-bf16-compiled-eager\.txt",
     "python3 scripts/profile_step.py --items 500 --precision bf16 --kernels compiled",
     "BENCHMARKS.md"),
    (r"2026-11-26-h200-bench-m(50|500)-(fp32|tf32|bf16)\.json",
     f"{_BENCH} --items {{1}} --precision {{2}} --steps 100 --json",
     "benchmarks/h100_session.sh a"),
    (r"2026-11-26-h200-bench-m500-tf32-old-tolerance\.json",
     f"{_BENCH} --items 500 --precision tf32 --steps 100 --json (TF32 band before it was "
     "widened)", "BENCHMARKS.md"),
    (r"2026-11-26-h200-bench-m500-J20000-B512-bf16\.json",
     f"{_BENCH} --items 500 --menu 20000 --batch 512 --precision bf16 --steps 20 --json",
     "benchmarks/h100_session.sh a"),
    (r"2026-11-26-h200-fbi-r(\d)-report\.json",
     f"{_TRAIN} --preset regions-m50 --set stage2.seed={{1}} --set menu.fallback=best "
     "--set menu.posted_price_init=true", "BENCHMARKS.md (issue 9); preset from the report"),
    (r"2026-11-26-h200-none-a(\d)-report\.json",
     f"{_TRAIN} --preset paper-m50 --set stage2.seed={{1}}",
     "BENCHMARKS.md (issue 9); preset from the report"),
    (r"2026-11-26-h200-none-r(\d)-report\.json",
     f"{_TRAIN} --preset regions-m50 --set stage2.seed={{1}}",
     "BENCHMARKS.md (issue 9); preset from the report"),
    (r"2026-11-26-h200-paper-m50-fallback-ppi-seed0-report\.json",
     f"{_TRAIN} --preset paper-m50 --set menu.fallback=best --set menu.posted_price_init=true",
     "BENCHMARKS.md (issue 9)"),
    (r"2026-11-26-h200-leak-paper-m50-graph\.json",
     "python3 scripts/leak_check.py --device cuda --steps 30000 --items 50 --menu-size 5000 "
     "--support 8 --batch 128 --hidden 128 --step graph", "BENCHMARKS.md"),
    (r"2026-11-26-h200-paper-m50-(bf16|fp16|no)-(\d)(?:-partial)?-metrics\.jsonl",
     f"{_TRAIN} --preset paper-m50 --no-progress --mixed-precision {{1}} "
     "--set stage2.seed={2}", "benchmarks/h100_session.sh b"),
    (r"2026-11-26-h200-paper-m50-fp32-seed0-.*",
     f"{_TRAIN} --preset paper-m50 --no-progress (fp32: before bf16 became the default)",
     "BENCHMARKS.md"),
    (r"2026-11-26-h200-precision-parity-paper-m50\.json",
     "python3 scripts/precision_parity.py RUN_DIR (the fp32 seed-0 run)",
     "benchmarks/h100_session.sh b"),
    (r"2026-11-26-h200-profile-m500-bf16-eager\.txt",
     "python3 scripts/profile_step.py --items 500 --precision bf16", "BENCHMARKS.md"),
    (r"2026-11-26-h200-x2-accelerate-launch-default\.log",
     "accelerate launch --config_file configs/accelerate/multi_gpu.yaml -m bundleflow train "
     "--preset default", "BENCHMARKS.md"),
    (r"2026-11-26-h200-x2-bench-m50-fp32\.json",
     f"{_BENCH} --items 50 --precision fp32 --steps 100 --json",
     "inferred from the file (shape, steps, precision)"),
    (r"2026-11-26-h200-x2-scaling-m150-J20000-B1024\.jsonl",
     "python3 scripts/bench_scaling.py --items 150 --menu 20000 --batch 1024 --steps 30 "
     "[--mixed-precision bf16], and under torchrun --nproc_per_node 2 with --parallel "
     "shard|replicate", "BENCHMARKS.md"),
]  # fmt: skip

LABELS = {
    "grand_bundle": "grand bundle",
    "uniform_item_price": "uniform item price",
    "item_pricing": "item pricing",
    "bundle_size_pricing": "bundle-size pricing",
}


# --------------------------------------------------------------------------- headline figures


def _ms(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f} ms"


def bench_headline(d: dict) -> str:
    shape = d["shape"]
    fast, ref = d["fast"], d["reference"]
    where = f"m={shape['items']}, J={shape['menu']}, B={shape['batch']}"
    if fast.get("median_ms") is None:
        parity = fast.get("parity") or {}
        tol = (parity.get("tolerance") or {}).get("grad_rel")
        text = (
            f"{where}: fast {fast.get('mode')} path refused by parity (gradients "
            f"{parity.get('grad_max_rel_diff', float('nan')):.2g} > {tol}); reference "
            f"{_ms(ref.get('median_ms'))}"
        )
    else:
        text = (
            f"{where}: fast {fast.get('mode')} {_ms(fast['median_ms'])} "
            f"[{fast['p10_ms']:.3f}, {fast['p90_ms']:.3f}], reference {_ms(ref.get('median_ms'))}, "
            f"{d['ratio']:.1f}×"
        )
    if "target_ms" in d:
        text += f"; target ≤ {d['target_ms']} ms {'met' if d.get('target_met') else 'missed'}"
    return text


def core_headline(d: dict) -> str:
    med = d["median_ms"]
    return (
        f"m={d['shape']['items']}: fast {med['fast']} ms, reference {med['reference']} ms "
        f"({d['ratio_reference_over_fast']}×), forward+backward"
    )


def cats_headline(d: dict) -> str:
    return (
        f"N={d['n']}, m={d['n_items']}: mean K {d['mean_atoms']:.3f}, share K=6 "
        f"{d['share_six_atoms']:.3f}, mean atom size {d['mean_atom_size']:.2f}, mean max value "
        f"{d['mean_max_value']:.1f}; generated in {d['seconds']:.1f} s"
    )


def report_headline(d: dict) -> str:
    rev = d["revenue"]
    lo, hi = rev["ci95"]
    text = f"test revenue {rev['mean']:.2f} [{lo:.2f}, {hi:.2f}] (n={rev['n']})"
    ratio = d.get("ratio_to_best_baseline")
    if ratio:
        lo, hi = ratio["ci95"]
        best = LABELS.get(d.get("best_baseline"), d.get("best_baseline"))
        text += f"; ÷ {best} {ratio['ratio']:.3f} [{lo:.3f}, {hi:.3f}]"
    elif "ratio_to_grand_bundle" in d:
        text += f"; ÷ grand bundle {d['ratio_to_grand_bundle']:.3f}"
    if "fallback" in d:
        text += "; with the posted-price fallback"
    if d.get("wall_time") is not None:
        text += f"; wall {d['wall_time']:.0f} s"
    return text


def run_record_headline(d: dict) -> str:
    flow = d.get("flow") or {}
    text = f"preset {d['config'].get('name')} on {d.get('device')}"
    if "loss_first" in flow:
        text += (
            f"; Stage 1 {flow.get('steps')} steps, loss {flow['loss_first']:.3f} → "
            f"{flow['loss_last']:.3f} in {flow.get('wall_time', 0):.0f} s"
        )
    return text


def stage1_quality_headline(d: dict) -> str:
    s = d["summary"]
    return (
        f"{d['schedule']} lr, {s['steps']} steps: loss {s['loss_first']:.3f} → "
        f"{s['loss_last']:.3f}; rounds like 1[z ≥ 0.5] on {d['U[0.05,0.95]']:.1%} of "
        f"U[0.05, 0.95], {d['menu init']:.1%} of menu-init points, {d['stage-1 inputs']:.1%} "
        f"of Stage-1 inputs; {d['seconds']:.0f} s"
    )


def parity_headline(d: dict) -> str:
    rev = "/".join(f"{d[p]['revenue']:.2f}" for p in ("fp32", "bf16", "fp16"))
    changed = "/".join(str(d[p]["bidders_choosing_differently"]) for p in ("bf16", "fp16"))
    entries = "/".join(str(d[p]["bundle_entries_differing"]) for p in ("bf16", "fp16"))
    return (
        f"test revenue fp32/bf16/fp16 {rev}; bidders choosing differently (bf16/fp16) "
        f"{changed}; bundle entries differing {entries} of {d['bf16']['bundle_entries']}"
    )


def leak_headline(d: dict) -> str:
    g, s = d["growth"], d["sizes"]
    return (
        f"{d['step_kind']} step, m={s['m']}, J={s['J']}: host RSS {g['rss_fraction']:+.2%} "
        f"({g['rss_mib']:+.1f} MiB) from step {g['from_step']} to {g['to_step']}; CUDA "
        f"allocated {g['cuda_allocated_fraction']:+.1%}, reserved "
        f"{g['cuda_reserved_fraction']:+.1%}; Python objects {g['python_objects']:+d}"
    )


def metrics_headline(records: list[dict]) -> str:
    s1 = [r for r in records if r.get("stage") == 1 and "loss" in r]
    s2 = [r for r in records if r.get("stage") == 2]
    parts = []
    if s1:
        parts.append(
            f"Stage 1 to step {s1[-1]['step']}, loss {s1[0]['loss']:.3f} → {s1[-1]['loss']:.3f}"
        )
    if s2:
        val = [r for r in s2 if "val_revenue" in r]
        last = s2[-1]
        if val:
            best = max(val, key=lambda r: r["val_revenue"])
            parts.append(
                f"Stage 2 best validation revenue {best['val_revenue']:.1f} at step {best['step']}"
            )
        parts.append(f"last Stage-2 step {last['step']} at {last.get('wall_time', 0):.1f} s")
    return "; ".join(parts) or "no Stage-1 or Stage-2 records"


def kernels_headline(records: list[dict]) -> str:
    out = []
    for r in records:
        t = r.get("median_ms")
        out.append(f"{r['kernels']} {_ms(t)}" if t is not None else f"{r['kernels']} refused")
    return f"{records[0].get('mode')} step: " + ", ".join(out)


def scaling_headline(records: list[dict]) -> str:
    return "; ".join(
        f"{r['processes']} × {r['parallel']} ({r['mixed_precision']}): {r['median_step_ms']} ms, "
        f"{r['valuations_per_s']:,.0f} val/s"
        for r in records
    )


PYTEST_SUMMARY = re.compile(r"(\d+ (?:failed|passed)[^\n=]*? in [\d.]+s(?: \([\d:]+\))?)")
REVENUE_LINE = re.compile(
    r"test revenue \(hard, (\d+) valuations\): ([\d.]+) \[95% CI ([\d.]+), ([\d.]+)\]"
)
RATIO_LINE = re.compile(r"menu / (best|grand bundle) = ([\d.]+)")
WALL_LINE = re.compile(r"wall time ([\d.]+) s on (.+)")
EXIT_LINE = re.compile(r"^(\S+) rc=(\d+)$", re.MULTILINE)


def text_headline(text: str) -> str:
    revenue = REVENUE_LINE.search(text)
    if revenue:
        n, mean, lo, hi = revenue.groups()
        parts = [f"test revenue {mean} [{lo}, {hi}] (n={n})"]
        ratio = RATIO_LINE.search(text)
        if ratio:
            parts.append(f"menu ÷ {ratio.group(1)} {ratio.group(2)}")
        wall = WALL_LINE.search(text)
        if wall:
            parts.append(f"wall {wall.group(1)} s")
        return "; ".join(parts)
    summaries = PYTEST_SUMMARY.findall(text)
    if summaries:
        return f"pytest: {summaries[-1].strip()}"
    codes = EXIT_LINE.findall(text)
    if codes:
        return "exit codes: " + ", ".join(f"{name} {rc}" for name, rc in codes)
    if "Self CUDA time total" in text:
        total = re.search(r"Self CUDA time total: (\S+)", text).group(1)
        top = _profile_top(text)
        return f"profiler: Self CUDA time total {total}" + (f"; top operator {top}" if top else "")
    if "driver_version" in text:
        lines = [x.strip() for x in text.splitlines() if x.strip()]
        return "; ".join(lines[1:3])
    return "—"


def _profile_top(text: str) -> str | None:
    """The first row of torch.profiler's table: its name and self CUDA share."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith("Name"):
            head = re.split(r"\s{2,}", line.strip())
            row = re.split(r"\s{2,}", lines[i + 2].strip())
            share = dict(zip(head, row, strict=False)).get("Self CUDA %")
            return f"{row[0]} ({share} of CUDA time)" if share else row[0]
    return None


def headline(path: Path, text: str) -> str:
    """The one figure a reader wants from the file, by what the content is."""
    if path.suffix == ".json":
        d = json.loads(text)
        if "fast" in d and "reference" in d:
            return bench_headline(d)
        if isinstance(d.get("median_ms"), dict):
            return core_headline(d)
        if "mean_atoms" in d:
            return cats_headline(d)
        if "revenue" in d and "n_test" in d:
            return report_headline(d)
        if "package_version" in d and "config" in d:
            return run_record_headline(d)
        if "schedule" in d and "summary" in d:
            return stage1_quality_headline(d)
        if "fp32" in d and "bf16" in d:
            return parity_headline(d)
        if "growth" in d:
            return leak_headline(d)
        return "—"
    if path.suffix == ".jsonl":
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
        if records and "stage" in records[0]:
            return metrics_headline(records)
        if records and "kernels" in records[0]:
            return kernels_headline(records)
        if records and "processes" in records[0]:
            return scaling_headline(records)
        return "—"
    return text_headline(text)


# --------------------------------------------------------------------------- the other columns


def recorded_command(path: Path, text: str) -> str | None:
    """A command the file records itself."""
    if path.suffix == ".json":
        d = json.loads(text)
        if isinstance(d.get("command"), str):
            cmd = d["command"]
            return re.sub(r"^\S*/bundleflow/__main__\.py", "python3 -m bundleflow", cmd)
        return None
    found = re.search(r"^\$ (.+)$", text, re.MULTILINE)
    return found.group(1) if found else None


def command(path: Path, text: str) -> tuple[str, str]:
    """(command, where it comes from)."""
    own = recorded_command(path, text)
    if own:
        return own, "the file"
    for pattern, template, source in COMMANDS:
        found = re.fullmatch(pattern, path.name)
        if found:
            return template.format(None, *found.groups()), source
    return "not recorded", "—"


def machine(path: Path, text: str) -> str:
    found = NAME.fullmatch(path.name)
    name = MACHINES.get(found.group("machine"), found.group("machine")) if found else "?"
    torch = TORCH_VERSION.search(text)
    return f"{name}, torch {torch.group(0)}" if torch else name


def summarise(path: Path) -> dict:
    data = path.read_bytes()
    text = data.decode("utf-8", errors="replace")
    found = NAME.fullmatch(path.name)
    cmd, source = command(path, text)
    try:
        figure = headline(path, text)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
        figure = f"— (not read: {type(err).__name__})"
    return {
        "file": path.name,
        "date": found.group("date") if found else "?",
        "machine": machine(path, text),
        "command": cmd,
        "command_source": source,
        "headline": figure,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


# --------------------------------------------------------------------------- the Markdown


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(rows: list[dict]) -> str:
    total = sum(r["bytes"] for r in rows)
    lines = [
        "# Benchmark results: summary of the raw outputs",
        "",
        "Generated by `python scripts/summarise_results.py` from the raw outputs in "
        "`benchmarks/results/raw/` (ignored by git; do not edit this file by hand). One row per "
        "raw file: its name, the date and machine (from the name; the torch build where the file "
        "records it), the command that produced it and where that command is recorded (`the "
        "file` itself, BENCHMARKS.md, or a session script that was in `benchmarks/` until "
        "issue 26: commit `d5c2caa` holds those and the `scripts/` they ran), the headline "
        "figure read from the file, its size and its sha256. BENCHMARKS.md has the context and "
        "the tables built from these files.",
        "",
        f"{len(rows)} files, {total / 1e6:.1f} MB. The files summarised here were removed from "
        f"the tree; commit `{LAST_COMMIT_WITH_RAW}` still holds them: "
        f"`git show {LAST_COMMIT_WITH_RAW}:benchmarks/results/FILE > FILE` restores one, and "
        "`sha256sum FILE` checks it against its row.",
        "",
        "| file | date | machine | command | command from | headline figure | bytes | sha256 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [
            f"`{r['file']}`", r["date"], r["machine"], f"`{r['command']}`",
            r["command_source"], r["headline"], str(r["bytes"]), f"`{r['sha256']}`",
        ]  # fmt: skip
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("raw", nargs="?", type=Path, default=DEFAULT_RAW, help="raw outputs")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the Markdown summary")
    args = parser.parse_args(argv)
    files = sorted(p for p in args.raw.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        print(f"{args.raw}: no raw files", file=sys.stderr)
        return 2
    rows = [summarise(p) for p in files]
    args.out.write_text(markdown(rows))
    unknown = [r["file"] for r in rows if r["command"] == "not recorded"]
    print(f"{args.out}: {len(rows)} rows", file=sys.stderr)
    if unknown:
        print(f"no command known for: {', '.join(unknown)} (add them to COMMANDS)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
