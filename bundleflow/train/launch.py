"""What a run is started with, and the config it resolves to.

A :class:`Launch` is the command line of ``bundleflow train | train-stage1 | train-stage2`` as
data (the command line builds one and hands it over; nothing rides on the argparse
namespace). :func:`resolve` turns it into the run's config: defaults < preset < ``--set`` <
flags. A new run records its flags in run.json (``launch``); ``--resume`` restores them from
there and refuses a flag that contradicts them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from dataclasses import replace as with_fields
from pathlib import Path

from loguru import logger

from bundleflow.errors import BundleflowError
from bundleflow.paths import CONFIG_FILE, RUN_INFO, runs_root
from bundleflow.train.config import Config, load_config, parse_set, replace, to_flat_dict
from bundleflow.train.run import check_budgets, check_config_budgets
from bundleflow.valuations import io as data_io
from bundleflow.valuations.io import Dataset

DEFAULT_PRESET = "default"
LAUNCH = "launch"  # run.json: the flags the run was started with (restored by --resume)
FLAG_OF = {"device": "--device", "mixed_precision": "--mixed-precision"}


@dataclass(frozen=True)
class Launch:
    """The flags of one ``bundleflow train*`` invocation (None: not given)."""

    command: str = "train"  # train | train-stage1 | train-stage2
    preset: str | None = None
    overrides: tuple[str, ...] = ()  # --set KEY=VALUE, in order
    data: str | None = None
    device: str | None = None
    mixed_precision: str | None = None
    max_steps: int | None = None
    max_time: float | None = None
    flow_ckpt: str | None = None
    report_to: str | None = None
    resume: str | None = None
    runs_dir: str | None = None
    no_progress: bool = False
    argv: str = ""  # the whole command line, for run.json


@dataclass
class Resolved:
    """A launch resolved: the config, the record written to run.json, the budgets (a resumed
    run's own unless given again) and the data file already read (``--data``), if any."""

    launch: Launch
    config: Config
    record: dict
    max_steps: int | None
    max_time: float | None
    dataset: Dataset | None = None
    notes: list[str] = field(default_factory=list)


def config_overrides(launch: Launch) -> dict:
    """``--set`` and the flags that are config keys, as one override dict."""
    overrides = parse_set(list(launch.overrides))
    if launch.device:
        overrides["device"] = launch.device
    if launch.mixed_precision:
        overrides["mixed_precision"] = launch.mixed_precision
    return overrides


def resolve(launch: Launch) -> Resolved:
    """Defaults < preset < --set < flags (env/.env only hold paths, never hyper-parameters)."""
    check_budgets(launch.max_steps, launch.max_time)
    overrides = config_overrides(launch)
    if launch.resume:
        return _resume(launch, overrides)
    dataset = take_data_file(launch.data, overrides) if launch.data else None
    config = load_config(launch.preset or DEFAULT_PRESET, overrides)
    check_config_budgets(config)
    record = {
        "command": launch.command,
        "preset": launch.preset or DEFAULT_PRESET,
        "set": list(launch.overrides),
        "data": config.data.path if launch.data else None,
        "data_sha256": None,  # filled in once the data are read
        "max_steps": launch.max_steps,
        "max_time": launch.max_time,
        "device": launch.device,
        "mixed_precision": launch.mixed_precision,
        "flow_ckpt": launch.flow_ckpt,
        "report_to": launch.report_to or "none",
    }
    return Resolved(launch, config, record, launch.max_steps, launch.max_time, dataset)


def data_path(flag: str) -> Path:
    """``--data FILE`` as a path that is a file; a missing path or a directory is a user
    error saying which."""
    path = Path(flag).expanduser()
    if path.is_dir():
        raise BundleflowError(
            f"--data {flag}: is a directory; pass a data file (.safetensors, .pt/.pth, .zip, "
            ".txt/.cats), e.g. one `bundleflow data generate --out FILE` wrote"
        )
    if not path.is_file():
        raise BundleflowError(f"--data {flag}: no such file")
    return path


def take_data_file(flag: str, overrides: dict) -> Dataset:
    """``--data FILE``: the run's data are the file (recorded in the config as kind ``file``
    with its absolute path, so a resumed run reads it again), m is the file's and the money
    scale is the file's training mean unless the user set them. Returns the file read."""
    path = data_path(flag)
    dataset = data_io.load_dataset(path)  # one clear error naming the file if it is bad
    data = overrides.setdefault("data", {})
    if not isinstance(data, dict):
        raise BundleflowError("--set data=...: 'data' is a section; set data.KEY=VALUE")
    wanted = data.get("n_items")
    if wanted is not None and wanted != dataset.n_items:
        raise BundleflowError(
            f"{path}: the file has m={dataset.n_items} items but --set data.n_items={wanted}; "
            "drop that --set (m comes from the file) or use a file with that many items"
        )
    data.update(n_items=dataset.n_items, kind="file", path=str(path.resolve()))
    data.setdefault("money_scale", None)
    return dataset


# --------------------------------------------------------------------------- --resume


def read_run_info(run_dir: Path) -> dict:
    """run.json of a run directory; a missing or damaged one is a user error naming it."""
    if not run_dir.is_dir():
        raise BundleflowError(
            f"--resume {run_dir}: no such run directory (runs are under "
            f"{runs_root(None)}; pass the directory `bundleflow train` printed)"
        )
    info_path = run_dir / RUN_INFO
    if not info_path.is_file() or not (run_dir / CONFIG_FILE).is_file():
        raise BundleflowError(
            f"--resume {run_dir}: not a bundleflow run directory (no {RUN_INFO} / {CONFIG_FILE})"
        )
    try:
        info = json.loads(info_path.read_bytes())
    except (ValueError, OSError) as err:
        raise BundleflowError(f"{info_path}: unreadable ({err}); the run is damaged") from None
    if not isinstance(info, dict):
        raise BundleflowError(f"{info_path}: not a JSON object; the run is damaged")
    return info


def _legacy_launch(info: dict) -> dict:
    """What a run written before run records can tell: its data file, from run.json."""
    data = info.get("data") or {}
    if data.get("kind") == "file":
        return {"data": data.get("path"), "data_sha256": data.get("sha256")}
    return {}


class _Conflicts(list):
    def add(self, flag: str, given, was) -> None:
        self.append(f"{flag} {given} contradicts the run's {flag} {was}")


def _resume(launch: Launch, overrides: dict) -> Resolved:
    """The run's own config and flags; a flag given again must agree with the record."""
    run_dir = Path(launch.resume)
    info = read_run_info(run_dir)
    record = dict(info.get(LAUNCH) or _legacy_launch(info))
    recorded = load_config(str(run_dir / CONFIG_FILE))
    if record.get("data") and recorded.data.kind != "file":  # a run from before the record
        recorded = replace(recorded, data={"kind": "file", "path": record["data"]})
    conflicts = _Conflicts()
    if launch.preset is not None and launch.preset != record.get("preset", launch.preset):
        conflicts.add("--preset", launch.preset, record["preset"])
    if overrides:
        _check_overrides(launch, recorded, overrides, conflicts)
    recorded = _resume_data(launch, recorded, record, info, conflicts)
    budgets = {a: _resume_budget(launch, record, f, a, conflicts) for f, a in
               (("--max-steps", "max_steps"), ("--max-time", "max_time"))}  # fmt: skip
    was = record.get("report_to") or "none"  # where metrics go changes no result: may change
    if launch.report_to is not None and launch.report_to != was:
        logger.info("--report-to {}: this run reported to {} until now", launch.report_to, was)
    record["report_to"] = launch.report_to or was
    if launch.flow_ckpt and launch.flow_ckpt != record.get("flow_ckpt"):
        conflicts.add(
            "--flow-ckpt", launch.flow_ckpt, record.get("flow_ckpt") or "(none: its own Stage 1)"
        )
    if conflicts:
        raise BundleflowError(
            f"--resume {run_dir}: " + "; ".join(conflicts) + ". Drop those flags to continue the "
            "run as it was started, or start a new run"
        )
    return Resolved(launch, recorded, record, budgets["max_steps"], budgets["max_time"])


def _check_overrides(launch: Launch, recorded: Config, overrides: dict, conflicts) -> None:
    asked = to_flat_dict(replace(recorded, **overrides))  # validates keys and types
    have = to_flat_dict(recorded)
    for key in sorted(k for k in asked if asked[k] != have[k]):
        flag = FLAG_OF.get(key)
        if flag and getattr(launch, key) is not None:
            conflicts.add(flag, asked[key], have[key])
        else:
            conflicts.add("--set", f"{key}={asked[key]}", f"{key}={have[key]}")


def _resume_data(launch: Launch, recorded: Config, record: dict, info: dict, conflicts) -> Config:
    """``--data`` given again must be the run's file (by content; a moved file is read from
    its new place); not given, the recorded file must still be there, unchanged."""
    recorded_sha = record.get("data_sha256") or (info.get("data") or {}).get("sha256")
    if launch.data:
        path = data_path(launch.data).resolve()
        sha = data_io.file_sha256(path)
        if recorded.data.kind != "file":
            conflicts.add("--data", path, "generated data (it was started without --data)")
        elif sha != recorded_sha:
            conflicts.add(
                "--data", f"{path} (sha256 {sha[:12]})", f"{recorded.data.path} "
                f"(sha256 {str(recorded_sha)[:12]})"
            )  # fmt: skip
        elif str(path) != recorded.data.path:  # the same content, moved: read it from here
            logger.info("data file moved: {} -> {} (same sha256)", recorded.data.path, path)
            recorded = replace(recorded, data={"path": str(path)})
            record["data"] = str(path)
    elif recorded.data.kind == "file":
        _check_recorded_data(Path(recorded.data.path), recorded_sha)
    return recorded


def _resume_budget(launch: Launch, record: dict, flag: str, attr: str, conflicts):
    """A budget not given again is the run's; given, it must agree, or be new to the run."""
    given, was = getattr(launch, attr), record.get(attr)
    if given is None:
        return was
    if was is not None and given != was:
        conflicts.add(flag, given, was)
    elif was is None:  # a budget the run had none of: this continuation's, recorded
        logger.info("{} {}: a new budget for this run (it was started without)", flag, given)
        record[attr] = given
    return given


def _check_recorded_data(path: Path, sha: str | None) -> None:
    if not path.is_file():
        raise BundleflowError(
            f"--resume: the run was trained on {path}, which is gone; pass --data FILE with "
            f"the same content (sha256 {str(sha)[:12]}...) or start a new run"
        )
    if sha is not None and data_io.file_sha256(path) != sha:
        raise BundleflowError(
            f"--resume: {path} has changed since the run started (sha256 {sha[:12]}... then, "
            f"{data_io.file_sha256(path)[:12]}... now); restore the file or start a new run"
        )


def stage1_only(resolved: Resolved) -> Resolved:
    """``train-stage1 --max-steps N``: Stage 1's step count is N."""
    if not resolved.max_steps:
        return resolved
    return with_fields(
        resolved, config=replace(resolved.config, stage1={"steps": resolved.max_steps})
    )
