"""The runs `bundleflow compare` puts side by side: finding run directories, reading each
into a flat record, and grouping the runs that differ only by seeds.

Reads what each run directory already holds — ``run.json`` (the launch record: preset,
``--set`` overrides, flags; the device), ``config.yaml`` (the resolved config: seeds) and
``report.json`` (test revenue and the paired ratio to the best baseline, with their CIs) —
and recomputes nothing. The file names are the foundation's (:mod:`bundleflow.paths`); the
config defaults belong to ``train``, a layer above this one, so they come in as a
:class:`RunLayout`.
"""

from __future__ import annotations

import glob
import json
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bundleflow.errors import BundleflowError
from bundleflow.evaluation.report import REPORT_JSON
from bundleflow.paths import CONFIG_FILE, METRICS_FILE, RUN_INFO, runs_root

SEED_KEYS = ("data.seed", "stage1.seed", "stage2.seed", "eval.seed")
"""Config keys that only reseed a run: runs that differ in these alone form one group."""
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

DONE = "done"
INCOMPLETE = "incomplete"
STAGE1_ONLY = "stage-1 only"


@dataclass(frozen=True)
class RunLayout:
    """What a run directory holds: the current config defaults, flat (``stage2.seed``: 0,
    …), which fill the keys a run of an older version lacks, as when ``--resume`` loads its
    config; the launch record (``run.json``), the resolved config (``config.yaml``) and the
    metrics log (``metrics.jsonl``), named as :mod:`bundleflow.paths` names them."""

    defaults: dict[str, Any]
    run_info: str = RUN_INFO
    config_file: str = CONFIG_FILE
    metrics_file: str = METRICS_FILE


# --------------------------------------------------------------------------- finding runs


def _has_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def is_run_dir(path: Path, layout: RunLayout) -> bool:
    return path.is_dir() and any(
        (path / name).is_file() for name in (layout.run_info, layout.config_file)
    )


def _runs_hint() -> str:
    """Where the runs are (the hint `evaluate` and `menu show` give too)."""
    root = runs_root()
    return f"`ls {root}` lists the runs" if root.is_dir() else f"no runs in {root} yet"


def _not_a_run(path: Path, layout: RunLayout) -> BundleflowError:
    runs = _runs_hint()
    if not path.exists():
        return BundleflowError(f"{path}: no such run directory; {runs}")
    if not path.is_dir():
        return BundleflowError(f"{path}: a file, not a run directory; {runs}")
    inner = sorted(p.name for p in path.iterdir() if is_run_dir(p, layout))
    if inner:  # a folder of runs (--runs-dir, the runs root): say which glob selects them
        runs = f"it holds {len(inner)} run directories: pass '{path / '*'}'"
    return BundleflowError(f"{path}: not a bundleflow run directory (no {layout.run_info}); {runs}")


def expand_runs(patterns: list[str], layout: RunLayout) -> list[Path]:
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
            if not is_run_dir(path, layout):
                raise _not_a_run(path, layout)
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


def _read_config(run_dir: Path, info: dict, layout: RunLayout) -> dict:
    """The resolved config as a plain dict: ``config.yaml``, else the copy in ``run.json``.
    Read as YAML, not through the schema, so runs of older versions still compare."""
    path = run_dir / layout.config_file
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


def _device_type(device: str | None) -> str | None:
    return None if device is None else device.split(":")[0]


def read_run(run_dir: Path, layout: RunLayout) -> tuple[dict, str]:
    """One run as a flat record (the JSON's ``runs``): settings, seeds, state, and the
    report's figures when there is a report; and its group key (the resolved config without
    seeds, the launch flags that change training, the device type)."""
    info_path = run_dir / layout.run_info
    info = _read_json(info_path) if info_path.is_file() else {}
    if not isinstance(info, dict):
        raise BundleflowError(f"{info_path}: not a JSON object; the run is damaged")
    flat = flatten(_read_config(run_dir, info, layout))
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
        last = last_metrics(run_dir / layout.metrics_file)
        if last is not None:
            record["progress"] = {"stage": last.get("stage"), "step": last.get("step")}
    # A key the run's config lacks (a run of an older version) has the current default, as
    # when `--resume` loads that config.
    resolved = {**layout.defaults, **flat}
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
