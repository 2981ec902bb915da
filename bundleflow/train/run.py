"""Run directories: where a run's config, metrics, log, checkpoints and report live."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from loguru import logger

from bundleflow import __version__
from bundleflow.atomic import atomic_write_bytes, write_error
from bundleflow.errors import BundleflowError
from bundleflow.paths import CONFIG_FILE, METRICS_FILE, RUN_INFO
from bundleflow.system.tracking import Tracker
from bundleflow.train.checkpoint import torch_build
from bundleflow.train.config import Config, to_dict

LOG_FILE = "train.log"
_RUN_ID_TRIES = 100


def new_run_dir(root: Path, name: str) -> Path:
    """A fresh, unique run directory ``NAME-YYYYmmdd-HHMMSS-xxxxxx`` (never reused).

    ``mkdir`` without ``exist_ok`` is the claim: two runs started in the same second with
    the same name get different directories (a collision of the random part is retried).
    """
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise write_error(root, err) from None
    if not os.access(root, os.W_OK):
        raise BundleflowError(f"{root}: runs directory is not writable; pass --runs-dir")
    for _ in range(_RUN_ID_TRIES):
        path = root / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        try:
            path.mkdir()
        except FileExistsError:
            continue
        except OSError as err:
            raise write_error(root, err) from None
        return path
    raise BundleflowError(f"{root}: could not claim a new run directory for {name!r}")


class _LogFile:
    """The run's log file as a loguru sink. A line that cannot be written (full disk) ends
    the file quietly instead of printing loguru's traceback: the checkpoint or metrics write
    that follows reports the full disk as one clear error."""

    def __init__(self, path: Path) -> None:
        try:
            self._handle = path.open("a")
        except OSError as err:
            raise write_error(path, err) from None
        self._broken = False

    def write(self, message: str) -> None:
        if self._broken:
            return
        try:
            self._handle.write(message)
            self._handle.flush()
        except OSError:
            self._broken = True

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._handle.close()


@dataclass
class Run:
    """An open run directory. Only the main process writes."""

    dir: Path
    config: Config
    main_process: bool = True
    info: dict[str, Any] = field(default_factory=dict)
    tracker: Tracker | None = None  # --report-to: each metrics line goes there too
    _log_sink: int | None = None
    _log_file: _LogFile | None = None

    def write_json(self, name: str, payload: dict) -> Path:
        path = self.dir / name
        if self.main_process:
            atomic_write_bytes(path, (json.dumps(payload, indent=2, default=str) + "\n").encode())
        return path

    def metrics(self, **record: Any) -> None:
        """Append one JSON line to ``metrics.jsonl`` (and send it to the tracker)."""
        if not self.main_process:
            return
        line = json.dumps(record, default=float) + "\n"
        try:
            with (self.dir / METRICS_FILE).open("a") as handle:
                handle.write(line)
        except OSError as err:
            raise write_error(self.dir / METRICS_FILE, err) from None
        if self.tracker is not None:
            self.tracker.log_record(record)

    def update_info(self, **items: Any) -> None:
        self.info.update(items)
        self.write_json(RUN_INFO, self.info)

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()
            self.tracker = None
        if self._log_sink is not None:
            logger.remove(self._log_sink)
            self._log_sink = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


def open_run(
    root: Path, config: Config, *, main_process: bool = True, resume: Path | None = None
) -> Run:
    """Create a new run directory (or reopen ``resume``) and record config and versions."""
    if resume is not None:
        if not (resume / RUN_INFO).is_file():
            raise BundleflowError(f"{resume}: not a bundleflow run directory (no {RUN_INFO})")
        run_dir = resume
        try:
            info = json.loads((resume / RUN_INFO).read_bytes())
        except (ValueError, OSError) as err:
            raise BundleflowError(
                f"{resume / RUN_INFO}: unreadable ({err}); is this a bundleflow run directory?"
            ) from None
        if not isinstance(info, dict):
            raise BundleflowError(f"{resume / RUN_INFO}: not a JSON object; the run is damaged")
    else:
        run_dir = new_run_dir(root, config.name) if main_process else root
        info = {
            "package_version": __version__,
            "build": torch_build(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
    run = Run(dir=run_dir, config=config, main_process=main_process, info=info)
    if main_process:
        atomic_write_bytes(
            run_dir / CONFIG_FILE, yaml.safe_dump(to_dict(config), sort_keys=False).encode()
        )
        run.update_info(config=to_dict(config))
        run._log_file = _LogFile(run_dir / LOG_FILE)
        run._log_sink = logger.add(
            run._log_file.write,
            level="DEBUG",
            format="{time:YYYY-MM-DD HH:mm:ss} {level} {message}",
        )
    return run


def check_budgets(max_steps: int | None, max_time: float | None) -> None:
    """``--max-steps N`` (N ≥ 1) and ``--max-time SECONDS`` (> 0): a budget of zero or less
    is a user error naming the flag (``--max-steps 0`` used to run the whole schedule)."""
    if max_steps is not None and max_steps < 1:
        raise BundleflowError(
            f"--max-steps {max_steps}: give at least 1 step (a budget of zero or fewer steps "
            "trains nothing; leave the flag out for the config's full schedule)"
        )
    if max_time is not None and not max_time > 0:  # NaN too
        raise BundleflowError(
            f"--max-time {max_time:g}: give a positive number of seconds (leave the flag out "
            "for no time limit)"
        )


def check_config_budgets(config: Config) -> None:
    """``stage2.max_time`` (``--set``, a preset) must be null or positive."""
    seconds = config.stage2.max_time
    if seconds is not None and not seconds > 0:
        raise BundleflowError(
            f"config key 'stage2.max_time' must be positive or null (no limit), got {seconds!r}"
        )


def resume_command(run_dir: Path, command: str | None, *, no_progress: bool = False) -> str:
    """The command line that continues the run in ``run_dir``, to paste (the path quoted for
    the shell): ``--resume`` restores every flag the run was started with (run.json's launch
    record); ``--no-progress`` is not recorded, so it is repeated."""
    words = ["bundleflow", command or "train", "--resume", str(run_dir)]
    return shlex.join([*words, "--no-progress"] if no_progress else words)


class Session:
    """One invocation's share of a run's wall time, as a context manager: run.json's
    ``segments`` gets one entry per session (a resumed run has several) however the session
    ends — ``finished`` (:meth:`close` with the report), ``stopped`` (a signal, checkpoint
    written), ``interrupted`` (a second signal), ``failed``. ``elapsed``: the session's
    seconds so far; ``hint``: the resume command logged after a second signal."""

    def __init__(self, run: Run, elapsed: Callable[[], float], hint: str) -> None:
        self.run, self.elapsed, self.hint = run, elapsed, hint
        self.started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.segments = [s for s in run.info.get("segments", []) if isinstance(s, dict)]
        self.closed = False

    def close(self, end: str) -> list[dict]:
        """Record this session once; every segment of the run so far."""
        if not self.closed:
            self.closed = True
            this = {"started": self.started, "wall_time": round(self.elapsed(), 3), "end": end}
            self.segments = [*self.segments, this]
            if self.run.dir.is_dir():  # a new run removed after a user error records nothing
                self.run.update_info(segments=self.segments)
        return self.segments

    def __enter__(self) -> Session:
        return self

    def __exit__(self, kind, error, trace) -> None:
        if kind is KeyboardInterrupt:  # a second signal: the loop wrote what it could
            self.close("interrupted")
            if self.run.main_process:
                logger.warning("resume with: {}", self.hint)
        else:
            self.close("stopped" if kind is None else "failed")  # no-op once finished


def optimizer_step(loss, optimizer, accelerator=None) -> None:
    """zero_grad, backward (through Accelerate when there is one), step."""
    optimizer.zero_grad(set_to_none=True)
    if accelerator is not None:
        accelerator.backward(loss)
    else:
        loss.backward()
    optimizer.step()


def make_accelerator(config: Config, device: torch.device):
    """The Accelerator of a run (its process group, under several processes)."""
    from accelerate import Accelerator

    from bundleflow.system.distributed import before_process_group

    before_process_group()  # issue 28: before the group exists (see its docstring)
    kwargs = {"cpu": device.type == "cpu"}
    if config.mixed_precision is not None:  # only when the user set it (flag > launcher)
        kwargs["mixed_precision"] = config.mixed_precision
    return Accelerator(**kwargs)
