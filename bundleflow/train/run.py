"""Run directories: where a run's config, metrics, log, checkpoints and report live."""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from loguru import logger

from bundleflow import __version__
from bundleflow.atomic import atomic_write_bytes
from bundleflow.checkpoint import torch_build
from bundleflow.config import Config, to_dict
from bundleflow.errors import BundleflowError

RUN_INFO = "run.json"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
LOG_FILE = "train.log"


def runs_root(flag: str | None = None) -> Path:
    """``--runs-dir`` > ``$BUNDLEFLOW_HOME`` (its ``runs/``) > ``./runs``."""
    if flag:
        return Path(flag).expanduser()
    home = os.environ.get("BUNDLEFLOW_HOME")
    if home:
        return Path(home).expanduser() / "runs"
    return Path("runs")


def new_run_dir(root: Path, name: str) -> Path:
    """A fresh, unique run directory ``NAME-YYYYmmdd-HHMMSS-xxxxxx`` (never reused)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise BundleflowError(f"{root}: cannot create the runs directory ({err.strerror})") from err
    if not os.access(root, os.W_OK):
        raise BundleflowError(f"{root}: runs directory is not writable; pass --runs-dir")
    path = root / f"{name}-{stamp}-{uuid.uuid4().hex[:6]}"
    path.mkdir(exist_ok=False)
    return path


@dataclass
class Run:
    """An open run directory. Only the main process writes."""

    dir: Path
    config: Config
    main_process: bool = True
    info: dict[str, Any] = field(default_factory=dict)
    _log_sink: int | None = None

    def write_json(self, name: str, payload: dict) -> Path:
        path = self.dir / name
        if self.main_process:
            atomic_write_bytes(path, (json.dumps(payload, indent=2, default=str) + "\n").encode())
        return path

    def metrics(self, **record: Any) -> None:
        """Append one JSON line to ``metrics.jsonl``."""
        if not self.main_process:
            return
        with (self.dir / METRICS_FILE).open("a") as handle:
            handle.write(json.dumps(record, default=float) + "\n")

    def update_info(self, **items: Any) -> None:
        self.info.update(items)
        self.write_json(RUN_INFO, self.info)

    def close(self) -> None:
        if self._log_sink is not None:
            logger.remove(self._log_sink)
            self._log_sink = None


def open_run(
    root: Path, config: Config, *, main_process: bool = True, resume: Path | None = None
) -> Run:
    """Create a new run directory (or reopen ``resume``) and record config and versions."""
    if resume is not None:
        if not (resume / RUN_INFO).is_file():
            raise BundleflowError(f"{resume}: not a bundleflow run directory (no {RUN_INFO})")
        run_dir = resume
        info = json.loads((resume / RUN_INFO).read_text())
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
        run._log_sink = logger.add(
            run_dir / LOG_FILE, level="DEBUG", format="{time:YYYY-MM-DD HH:mm:ss} {level} {message}"
        )
    return run


def optimizer_step(loss, optimizer, accelerator=None) -> None:
    """zero_grad, backward (through Accelerate when there is one), step."""
    optimizer.zero_grad(set_to_none=True)
    if accelerator is not None:
        accelerator.backward(loss)
    else:
        loss.backward()
    optimizer.step()
