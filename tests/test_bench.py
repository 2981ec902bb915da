"""`bundleflow bench` and the Stage-2 step callable on CPU, at tiny sizes (seconds)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from bundleflow.cli.app import main
from bundleflow.perf import bench
from bundleflow.train import stage2_step as fast_step
from bundleflow.train.stage2_step import Stage2Step, StepOptions, make_optimizer, stage2_loss

TINY = [
    "--items", "10", "--menu", "40", "--support", "4", "--batch", "16", "--atoms", "3",
    "--steps", "5", "--warmup", "2", "--eval-valuations", "32", "--device", "cpu",
]  # fmt: skip


def run_json(capsys, *extra):
    code = main(["bench", *TINY, "--json", *extra])
    out = capsys.readouterr().out
    return code, json.loads(out)


def test_bench_json_shape(capsys):
    code, report = run_json(capsys)
    assert code == 0
    for path in ("fast", "reference"):
        entry = report[path]
        assert entry["median_ms"] > 0
        assert entry["steps"] == 5
        assert entry["parity"]["ok"] is True
        assert entry["precision"]
    assert report["ratio"] == pytest.approx(
        report["reference"]["median_ms"] / report["fast"]["median_ms"], rel=1e-2
    )
    assert report["fast"]["mode"] == "eager"
    assert report["eval"]["valuations"] == 32 and report["eval"]["valuations_per_s"] > 0
    assert report["shape"] == {
        "items": 10, "menu": 40, "support": 4, "batch": 16, "atoms": 3, "euler_steps": 5
    }  # fmt: skip


def test_bench_text_output(capsys):
    assert main(["bench", *TINY]) == 0
    out = capsys.readouterr().out
    assert "fast" in out and "reference" in out and "valuations/s" in out


def test_bench_refuses_to_time_a_path_failing_parity(capsys, monkeypatch):
    def broken(*args, **kwargs):
        loss, bundles = stage2_loss(*args, **kwargs)
        return loss * 1.01, bundles

    monkeypatch.setattr(fast_step, "stage2_loss", broken)  # the fast path only
    code, report = run_json(capsys)
    assert code == 1
    assert report["fast"]["parity"]["ok"] is False
    assert report["fast"]["median_ms"] is None
    assert report["reference"]["parity"]["ok"] is True
    assert report["reference"]["median_ms"] > 0
    assert report["ratio"] is None and report["parity_ok"] is False


def test_bench_target_ms_exit_code(capsys):
    code, report = run_json(capsys, "--target-ms", "1e-6")
    assert code == 1 and report["target_met"] is False
    code, report = run_json(capsys, "--target-ms", "1e6")
    assert code == 0 and report["target_met"] is True


def test_bench_graph_mode_needs_cuda(capsys):
    assert main(["bench", *TINY, "--graph"]) == 2


def small_setup(mode="eager"):
    cfg = bench.BenchConfig(
        items=8, menu=20, support=3, batch=8, atoms=2, pool=64, eval_valuations=8
    )
    flow, menu, pool, _ = bench.build(cfg, torch.device("cpu"))
    opt = make_optimizer(menu, None, mode)
    return flow, menu, pool, opt


def test_stage2_step_matches_the_plain_loop():
    flow, menu, pool, opt = small_setup()
    step = Stage2Step(menu, flow, opt, pool, 8, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(1)
    menu2 = copy.deepcopy(menu)
    opt2 = torch.optim.Adam(menu2.parameters(), lr=0.3)
    for _ in range(3):
        loss = step(1e-3, 1e-3)
        index = torch.randint(pool.shape[0], (8,), generator=gen)
        eps = menu2.draw_noise(gen)
        opt2.zero_grad(set_to_none=True)
        loss2, _ = stage2_loss(menu2, flow, pool[index], 1e-3, 1e-3, eps)
        loss2.backward()
        opt2.step()
        assert torch.equal(loss, loss2.detach())
    for a, b in zip(menu.parameters(), menu2.parameters(), strict=True):
        assert torch.equal(a, b)


def test_graph_mode_refused_on_cpu():
    flow, menu, pool, opt = small_setup()
    with pytest.raises(ValueError, match="CUDA"):
        Stage2Step(menu, flow, opt, pool, StepOptions(8, mode="graph"))


def test_compile_failure_falls_back_to_eager(monkeypatch):
    def failing_compile(fn, **kwargs):
        def compiled(*a, **k):
            raise RuntimeError("no compiler here")

        return compiled

    monkeypatch.setattr(torch, "compile", failing_compile)
    flow, menu, pool, opt = small_setup()
    step = Stage2Step(menu, flow, opt, pool, StepOptions(8, mode="compile"))
    loss = step(1e-3, 1e-3)
    assert torch.isfinite(loss)
    assert "no compiler here" in step.eager_reason
    assert step(1e-3, 1e-3).shape == ()


def test_bench_reports_a_compile_fallback(capsys, monkeypatch):
    def failing_compile(fn, **kwargs):
        def compiled(*a, **k):
            raise RuntimeError("no compiler here")

        return compiled

    monkeypatch.setattr(torch, "compile", failing_compile)
    code, report = run_json(capsys, "--compile")
    assert code == 0
    assert report["fast"]["mode"] == "compile"
    assert "no compiler here" in report["fast"]["fallback"]
    assert main(["bench", *TINY, "--compile"]) == 0
    assert "fell back to eager" in capsys.readouterr().out
