"""A markdown table of finished runs' hard test revenue against the best baseline.

    python scripts/revenue_table.py RUNS_ROOT [...]      # every RUN/report.json below them

Runs are grouped by the name of the directory that holds them with its last ``-SEED`` cut
off (``runs/wide-0/default-...``, ``runs/wide-1/...`` form the group ``wide``); per group:
each seed's revenue and ratio to the best baseline with its paired 95% CI, and the mean
ratio. The score is always the frozen menu's hard revenue on the test split.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def rows(roots: list[Path]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for root in roots:
        for report in sorted(root.glob("**/report.json")):
            data = json.loads(report.read_text())
            holder = report.parent.parent.name
            group, _, seed = holder.rpartition("-")
            if not seed.isdigit():
                group, seed = holder, "?"
            ratio = data["ratio_to_best_baseline"]
            groups.setdefault(group, []).append(
                {
                    "seed": seed,
                    "revenue": data["revenue"]["mean"],
                    "best": data["best_baseline"],
                    "best_revenue": data["baselines"][data["best_baseline"]]["revenue"]["mean"],
                    "ratio": ratio["ratio"],
                    "ci": ratio["ci95"],
                    "wall": data.get("wall_time"),
                }
            )
    return groups


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("roots", nargs="+", type=Path)
    args = parser.parse_args(argv)
    groups = rows(args.roots)
    print("| variant | seed | test revenue | best baseline | ratio [paired 95% CI] |")
    print("|---|---|---|---|---|")
    for group, runs in groups.items():
        for r in sorted(runs, key=lambda r: r["seed"]):
            lo, hi = r["ci"]
            print(
                f"| {group} | {r['seed']} | {r['revenue']:.1f} | {r['best']} "
                f"{r['best_revenue']:.1f} | {r['ratio']:.3f} [{lo:.3f}, {hi:.3f}] |"
            )
        mean = statistics.fmean(r["ratio"] for r in runs)
        print(f"| **{group}** | mean of {len(runs)} | | | **{mean:.3f}** |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
