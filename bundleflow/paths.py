"""Where bundleflow keeps things on disk: the runs root and the cache directory.

A leaf module (standard library only), so the doctor, the data readers, training and the
CLI can all ask without importing each other.
"""

from __future__ import annotations

import os
from pathlib import Path

# What a run directory holds, by name (train writes them; evaluate, compare and --resume read)
RUN_INFO = "run.json"  # the launch record, data, plan, timings
CONFIG_FILE = "config.yaml"  # the resolved config
METRICS_FILE = "metrics.jsonl"  # one JSON line per logged step


def bundleflow_home() -> Path | None:
    """``$BUNDLEFLOW_HOME`` (user-expanded), or None when it is unset or empty."""
    home = os.environ.get("BUNDLEFLOW_HOME")
    return Path(home).expanduser() if home else None


def runs_root(flag: str | None = None) -> Path:
    """``--runs-dir`` > ``$BUNDLEFLOW_HOME`` (its ``runs/``) > ``./runs``."""
    if flag:
        return Path(flag).expanduser()
    home = bundleflow_home()
    if home is not None:
        return home / "runs"
    return Path("runs")


def default_cache_dir() -> Path:
    """``$BUNDLEFLOW_CACHE``, else ``~/.cache/bundleflow``."""
    env = os.environ.get("BUNDLEFLOW_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "bundleflow"
