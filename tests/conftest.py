"""Shared test helpers: where ../shared lives, and the recorded reference pass."""

from __future__ import annotations

import os
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
