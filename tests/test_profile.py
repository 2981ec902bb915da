"""`bundleflow profile` on the CPU with a tiny config (seconds), and the NVML sampler."""

from __future__ import annotations

import json
import sys
import time
import types

import torch

from bundleflow.cli.app import main
from bundleflow.perf.profiling import GpuSampler
from bundleflow.system.timing import step_stats
from tests.test_doctor import FakeNvml

TINY = [
    "data.n_items=5",
    "data.n_samples=200",
    "menu.size=16",
    "menu.support=2",
    "flow.hidden=8",
    "stage1.batch_size=16",
    "stage2.batch_size=8",
]


def test_profile_on_cpu_writes_trace_table_and_numbers(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BUNDLEFLOW_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "prof"
    sets = [arg for item in TINY for arg in ("--set", item)]
    argv = ["profile", "--device", "cpu", "--steps", "3", "--warmup", "1", "--stage1-steps", "2"]
    assert main([*argv, "--out", str(out), "--top", "5", *sets]) == 0
    printed = capsys.readouterr().out
    assert "## stage2" in printed and "Top operators by self CPU time" in printed

    report = json.loads((out / "profile.json").read_text())
    assert report["config"]["menu_size"] == 16 and report["config"]["n_items"] == 5
    for name, steps in (("stage1", 2), ("stage2", 3)):
        stage = report["stages"][name]
        assert stage["timing"]["steps"] == steps
        assert 0 < stage["timing"]["median_ms"] <= stage["timing"]["p90_ms"]
        assert 0 < len(stage["top_cpu"]) <= 5 and stage["top_device"] == []
        assert stage["gpu_utilization"] is None  # no GPU, no sampling
        assert stage["peak_memory"]["process_max_rss_gib"] > 0
    ops = {r["name"] for r in report["stages"]["stage2"]["top_cpu"]}
    assert any(name.startswith(("aten::", "Optimizer.")) for name in ops)
    trace = json.loads((out / "trace.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert "stage2 step 0" in names
    assert (out / "trace-stage1.json").is_file()
    md = (out / "profile.md").read_text()
    assert "median" in md and "p90" in md and "torch " + torch.__version__ in md


def test_profile_rejects_bad_counts(capsys):
    assert main(["profile", "--device", "cpu", "--steps", "0"]) == 2
    assert "--steps 0" in capsys.readouterr().err


def test_step_stats_nearest_rank_p90():
    stats = step_stats([i / 1000 for i in range(1, 11)])  # 1..10 ms
    assert stats["median_ms"] == 5.5 and stats["p90_ms"] == 9.0 and stats["max_ms"] == 10.0


def test_gpu_sampler_samples_nvml_and_shuts_down(monkeypatch):
    fake = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    props = types.SimpleNamespace(uuid="")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    with GpuSampler(torch.device("cuda", 0), interval=0.005) as sampler:
        time.sleep(0.05)
    summary = sampler.summary()
    assert summary["max_percent"] == 97 and summary["samples"] >= 2
    assert summary["memory_used_max_gib"] == 12.0
    assert fake.calls[0] == "init" and fake.calls[-1] == "shutdown"
    with GpuSampler(torch.device("cpu")) as cpu:
        pass
    assert cpu.summary() is None
