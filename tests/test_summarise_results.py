"""scripts/summarise_results.py: one summary row per raw benchmark output (command, machine,
date, headline figure, sha256), and BENCHMARKS.md's references to raw files all land on rows
of the shipped benchmarks/results/SUMMARY.md."""

from __future__ import annotations

import fnmatch
import hashlib
import itertools
import json
import re
import subprocess
import sys

from tests.conftest import REPO

SCRIPT = REPO / "scripts" / "summarise_results.py"
SUMMARY = REPO / "benchmarks" / "results" / "SUMMARY.md"


def _rows(markdown: str) -> dict[str, list[str]]:
    """file name -> the row's cells (file, date, machine, command, from, figure, bytes, sha)."""
    rows = {}
    for line in markdown.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            rows[cells[0].strip("`")] = cells
    return rows


def test_rows_from_a_directory_of_raw_files(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    bench = {
        "shape": {"items": 50, "menu": 5000, "batch": 128},
        "fast": {"mode": "graph", "median_ms": 0.719, "p10_ms": 0.715, "p90_ms": 0.732},
        "reference": {"median_ms": 4.78},
        "ratio": 6.65,
        "environment": {"torch": "2.11.0+cu130"},
    }
    report = {
        "n_test": 1000,
        "revenue": {"mean": 301.72, "ci95": [282.49, 320.94], "n": 1000},
        "best_baseline": "bundle_size_pricing",
        "ratio_to_best_baseline": {"ratio": 0.5217, "ci95": [0.481, 0.563]},
        "wall_time": 37.2,
    }
    files = {
        "2026-11-26-h200-bench-m50-bf16.json": json.dumps(bench),
        "2026-12-02-h100-some-report.json": json.dumps(report),
        "2026-12-02-cpu2-tests.log": "$ pytest -q tests/x.py\n....\n4 passed in 1.23s\n",
    }
    for name, text in files.items():
        (raw / name).write_text(text)
    out = tmp_path / "SUMMARY.md"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(raw), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "no command known for: 2026-12-02-h100-some-report.json" in proc.stderr
    rows = _rows(out.read_text())
    assert sorted(rows) == sorted(files)
    for name, text in files.items():
        cells = rows[name]
        assert cells[-1] == f"`{hashlib.sha256(text.encode()).hexdigest()}`"
        assert cells[-2] == str(len(text.encode()))
        assert cells[1] == name[:10]  # the date from the name
    bench_row = rows["2026-11-26-h200-bench-m50-bf16.json"]
    assert bench_row[2] == "NVIDIA H200, torch 2.11.0+cu130"
    assert (
        bench_row[3]
        == "`python3 -m bundleflow bench --items 50 --precision bf16 --steps 100 --json`"
    )
    assert "fast graph 0.719 ms" in bench_row[5] and "6.7×" in bench_row[5]
    report_row = rows["2026-12-02-h100-some-report.json"]
    assert report_row[3] == "`not recorded`"
    assert "test revenue 301.72 [282.49, 320.94]" in report_row[5]
    assert "÷ bundle-size pricing 0.522" in report_row[5]
    log_row = rows["2026-12-02-cpu2-tests.log"]
    assert (log_row[3], log_row[4]) == ("`pytest -q tests/x.py`", "the file")
    assert log_row[5] == "pytest: 4 passed in 1.23s"


def _expand(pattern: str) -> list[str]:
    """Brace expansion, ``{a,b}`` (as the shell does it)."""
    parts = re.split(r"\{([^{}]*)\}", pattern)
    choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
    return ["".join(c) for c in itertools.product(*choices)]


def test_benchmarks_md_names_only_files_the_summary_has():
    rows = _rows(SUMMARY.read_text())
    text = (REPO / "BENCHMARKS.md").read_text()
    cited = re.findall(r"`((?:2026-|\.\.\.-)[^`\s]*)`", text)
    assert len(cited) > 20
    for ref in cited:
        for pattern in _expand(ref.replace("...-", "*-", 1)):
            assert fnmatch.filter(rows, pattern), f"BENCHMARKS.md cites {ref}: no row {pattern}"
