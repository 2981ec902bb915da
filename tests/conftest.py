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
