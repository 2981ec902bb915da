"""Shared test helpers: where ../shared lives, the recorded reference pass, the CLI in a
subprocess, an isolated BUNDLEFLOW_HOME."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest
from hypothesis import settings

# Fuzz tests are derandomised (the same examples on every run, in CI and here) unless
# HYPOTHESIS_PROFILE=explore asks for fresh random examples.
settings.register_profile("bundleflow", derandomize=True, deadline=None, database=None)
settings.register_profile("explore", derandomize=False, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "bundleflow"))

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("BUNDLEFLOW_SHARED", REPO.parent / "shared"))
REFERENCE_FIXTURE = SHARED / "fixtures" / "reference_forward_m50.safetensors"


def require_shared(path: Path) -> Path:
    """Skip (with the reason printed by -ra) when a ../shared file is absent."""
    if not path.exists():
        pytest.skip(f"{path} not found: ../shared is absent on this machine")
    return path


@pytest.fixture(scope="session")
def reference_pass() -> dict:
    """The recorded Stage-2 forward/backward pass of the public code (float32, CPU)."""
    from safetensors.torch import load_file

    return load_file(str(require_shared(REFERENCE_FIXTURE)))


def isolated_bundleflow_home(tmp_path_factory, prefix: str):
    """Generator for a module fixture: BUNDLEFLOW_HOME / BUNDLEFLOW_CACHE and the working
    directory in a fresh temporary directory for the module; yields that directory."""
    root = tmp_path_factory.mktemp(prefix)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BUNDLEFLOW_HOME", str(root / "home"))
        mp.setenv("BUNDLEFLOW_CACHE", str(root / "cache"))
        mp.chdir(root)
        yield root


def single_torch_thread():
    """Generator for a module fixture: one torch thread while the module runs (tiny models
    are latency-bound; on a busy 2-core machine two threads are far slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------- the CLI in a process

CLI_TIMEOUT = 300
"""Seconds a CLI subprocess may take before the test fails (a tiny run takes seconds)."""


def cli_command(*args: str, python: str | os.PathLike = sys.executable) -> list[str]:
    """``python -m bundleflow ARGS`` as an argv list (e.g. for ``subprocess.Popen``)."""
    return [str(python), "-m", "bundleflow", *args]


def cli_env(env: Mapping[str, str | None] | None = None) -> dict[str, str] | None:
    """This process's environment with ``env`` applied (a None value removes the variable);
    None when there is nothing to apply (the child inherits the environment)."""
    if env is None:
        return None
    merged = dict(os.environ)
    for key, value in env.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    return merged


def run_cli(
    *args: str,
    env: Mapping[str, str | None] | None = None,
    cwd: str | os.PathLike | None = None,
    timeout: float = CLI_TIMEOUT,
    python: str | os.PathLike = sys.executable,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m bundleflow ARGS`` in a subprocess (the real console entry point: exit
    codes, stderr and no tracebacks as a user sees them) and return it finished, with its
    stdout and stderr as text. ``env`` is applied to this process's environment
    (:func:`cli_env`); ``python`` runs another interpreter (e.g. a fresh venv)."""
    return subprocess.run(
        cli_command(*args, python=python),
        capture_output=True,
        text=True,
        env=cli_env(env),
        cwd=cwd,
        timeout=timeout,
    )


def start_cli(
    *args: str,
    env: Mapping[str, str | None] | None = None,
    cwd: str | os.PathLike | None = None,
) -> subprocess.Popen[str]:
    """:func:`run_cli` started in the background (to signal it): stdout and stderr piped."""
    return subprocess.Popen(
        cli_command(*args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(env),
        cwd=cwd,
    )


def cli_error(proc: subprocess.CompletedProcess[str], lines: int = 1) -> list[str]:
    """The user-error contract of a finished CLI process: exit 2, no traceback, ``lines``
    lines on stderr, the first ``bundleflow: error: ...``. Returns those lines."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    found = proc.stderr.strip().splitlines()
    assert len(found) == lines, proc.stderr
    assert found[0].startswith("bundleflow: error: "), proc.stderr
    return found
