"""No leak over a long Stage-2 run: host RSS (and CUDA memory when there is a GPU) after
1,000 and after 30,000 steps agree within a few percent (scripts/leak_check.py, tiny menu).

The same script at paper size on an H100:
``python scripts/leak_check.py --device cuda --items 50 --menu-size 5000 --support 8
--batch 128 --hidden 128 --step graph``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "leak_check.py"
TOLERANCE = 0.03  # RSS may move by allocator noise, not by a leak's steady growth


def _run(*args: str) -> dict:
    out = subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _check(result: dict) -> None:
    growth = result["growth"]
    assert (growth["from_step"], growth["to_step"]) == (1000, 30000)
    rss = [s["rss_mib"] for s in result["samples"]]
    assert abs(growth["rss_fraction"]) < TOLERANCE, rss
    assert growth["python_objects"] < 1000, growth  # no objects piling up either
    if growth["cuda_allocated_fraction"] is not None:
        assert abs(growth["cuda_allocated_fraction"]) < TOLERANCE, result["samples"]
    sys.stderr.write(f"\nleak check ({result['device']}, {result['step_kind']}): {growth}\n")


@pytest.mark.slow
def test_no_host_memory_growth_over_30000_steps_cpu():
    _check(_run("--device", "cpu", "--steps", "30000", "--sample-every", "5000"))


@pytest.mark.slow
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_memory_growth_over_30000_steps_cuda_graph():
    _check(_run("--device", "cuda", "--steps", "30000", "--step", "graph", "--menu-size", "64"))
