"""Experiment tracking (`--report-to`): TensorBoard event files read back against
metrics.jsonl, the config as hyperparameters, the report; W&B through a stand-in module;
missing packages and bad values as user errors."""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path

import pytest

from bundleflow.errors import BundleflowError
from bundleflow.system import telemetry, tracking
from tests.conftest import cli_error, isolated_bundleflow_home, run_cli

CPU = ["--preset", "tiny", "--device", "cpu", "--no-progress"]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # a tiny run on a busy 2-core machine


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    yield from isolated_bundleflow_home(tmp_path_factory, "bf-tracking")


def _runs(env: Path) -> list[Path]:
    root = env / "home" / "runs"
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _events(run: Path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


def _text(events, tag: str) -> str:
    from tensorboard.util import tensor_util

    (last, *_) = reversed(events.Tensors(f"{tag}/text_summary"))
    return tensor_util.make_ndarray(last.tensor_proto).item().decode()


@pytest.fixture(scope="module")
def tensorboard_run(env) -> Path:
    pytest.importorskip("tensorboard")
    done = run_cli("train", *CPU, "--report-to", "tensorboard", env=ONE_THREAD)
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = _runs(env)
    return run


def test_tensorboard_holds_the_metrics_lines(tensorboard_run):
    """Every number of every metrics.jsonl line, in order, as stage{N}/{key} at its step."""
    events = _events(tensorboard_run)
    records = _records(tensorboard_run)
    expected: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        for key, value in record.items():
            if key not in ("stage", "step") and isinstance(value, int | float):
                tag = f"stage{record['stage']}/{key}"
                expected.setdefault(tag, []).append((record["step"], value))
    # Both stages, every kind of number: losses, soft and validation revenue, λ, step time.
    kinds = {"stage1/loss", "stage1/step_time", "stage2/soft_revenue", "stage2/val_revenue",
             "stage2/best_val_revenue", "stage2/inv_temp", "stage2/step_time"}  # fmt: skip
    assert kinds <= set(expected)
    assert set(expected) <= set(events.Tags()["scalars"])
    for tag, want in expected.items():
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [step for step, _ in got] == [step for step, _ in want], tag
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6, abs=1e-9), tag
    first = next(r for r in records if "soft_revenue" in r)
    logged = events.Scalars("stage2/soft_revenue")[0]
    assert (logged.step, logged.value) == (first["step"], pytest.approx(first["soft_revenue"]))


def test_tensorboard_holds_the_config_and_the_report(tensorboard_run):
    from tensorboard.plugins.hparams import plugin_data_pb2

    events = _events(tensorboard_run)
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    config = (tensorboard_run / "config.yaml").read_text()
    assert hparams["name"].string_value == "tiny"
    assert hparams["menu.size"].number_value == 32 and hparams["stage2.steps"].number_value == 20
    assert hparams["data.split"].string_value == "[0.9, 0.05, 0.05]"  # lists as text
    assert "menu:" in _text(events, "config") and "size: 32" in config
    report = json.loads((tensorboard_run / "report.json").read_text())
    (revenue,) = events.Scalars("report/test_revenue")
    assert revenue.value == pytest.approx(report["revenue"]["mean"], rel=1e-6)
    assert revenue.step == report["stage2"]["steps"]
    table = _text(events, "report")
    assert "| mechanism | test revenue |" in table and "bundle-size pricing" in table
    launch = json.loads((tensorboard_run / "run.json").read_text())["launch"]
    assert launch["report_to"] == "tensorboard"


def test_resume_reports_to_the_same_directory(env, tensorboard_run):
    """The flag comes back from run.json; the events go on in RUN_DIR/tensorboard."""
    before = sorted((tensorboard_run / "tensorboard").iterdir())
    done = run_cli("train", "--no-progress", "--resume", str(tensorboard_run), env=ONE_THREAD)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _runs(env) == [tensorboard_run]
    after = sorted((tensorboard_run / "tensorboard").iterdir())
    assert len(after) == len(before) + 1 and set(before) < set(after)
    events = _events(tensorboard_run)
    assert len(events.Scalars("report/test_revenue")) == 2  # a report from each session
    launch = json.loads((tensorboard_run / "run.json").read_text())["launch"]
    assert launch["report_to"] == "tensorboard"


# --------------------------------------------------------------------------- user errors


def test_wandb_missing_is_one_clear_error_before_training(tmp_path):
    try:
        import wandb  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("wandb is installed")
    env = {"BUNDLEFLOW_HOME": str(tmp_path / "home"), "BUNDLEFLOW_CACHE": str(tmp_path / "c")}
    (line,) = cli_error(run_cli("train", *CPU, "--report-to", "wandb", env=env))
    assert "--report-to wandb" in line and "pip install wandb" in line
    assert not (tmp_path / "home").exists() and not (tmp_path / "c").exists()  # nothing ran


def test_tensorboard_missing_names_the_extra(tmp_path):
    hidden = tmp_path / "hide" / "tensorboard"  # shadows an installed tensorboard
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('tensorboard hidden by the test')\n")
    path = os.pathsep.join(p for p in (str(hidden.parent), os.environ.get("PYTHONPATH")) if p)
    env = {"PYTHONPATH": path, "BUNDLEFLOW_HOME": str(tmp_path / "home")}
    (line,) = cli_error(run_cli("train", *CPU, "--report-to", "tensorboard", env=env))
    assert "pip install 'bundleflow[tracking]'" in line
    assert not (tmp_path / "home").exists()


def test_a_bad_value_is_refused_by_argparse():
    done = run_cli("train", *CPU, "--report-to", "mlflow")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "invalid choice: 'mlflow'" in done.stderr


# --------------------------------------------------------------------------- W&B, stood in for


class _FakeWandbRun:
    id = "fake"
    url = None

    def __init__(self, **kw) -> None:
        self.init, self.logged, self.axes = kw, [], {}
        self.config = types.SimpleNamespace(update=lambda d, **kw: self.init["config"].update(d))
        self.summary: dict = {}
        self.finished = False

    def define_metric(self, name, step_metric=None) -> None:
        self.axes[name] = step_metric

    def log(self, payload) -> None:
        self.logged.append(payload)

    def finish(self) -> None:
        self.finished = True


def _fake_wandb(fail: Exception | None = None) -> types.ModuleType:
    module = types.ModuleType("wandb")
    module.runs = []

    def init(**kw):
        if fail is not None:
            raise fail
        module.runs.append(_FakeWandbRun(**kw))
        return module.runs[-1]

    module.init = init
    module.Table = lambda columns, data: ("table", columns, data)
    return module


def test_wandb_gets_the_same_names_on_each_stage_axis(monkeypatch, tmp_path):
    fake = _fake_wandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    run_dir = tmp_path / "tiny-20260101-000000-abc123"
    tracker = tracking.open_tracker("wandb", run_dir, {"menu": {"size": 32}})
    (run,) = fake.runs
    assert run.init["id"] == run_dir.name and run.init["resume"] == "allow"
    assert run.init["dir"] == str(run_dir) and run.init["config"] == {"menu": {"size": 32}}
    assert run.axes["stage2/*"] == "stage2/step" and run.axes["report/*"] == "stage2/step"
    tracker.log_record({"stage": 2, "step": 5, "soft_revenue": 1.5, "inv_temp": 10, "x": "y"})
    tracker.log_record({"stage": 1, "step": 7, "loss": 0.25, "unstable": True})
    assert run.logged == [
        {"stage2/soft_revenue": 1.5, "stage2/inv_temp": 10.0, "stage2/step": 5},
        {"stage1/loss": 0.25, "stage1/step": 7},
    ]
    tracker.log_report("summary", (["a", "b"], [["1", "2"]]), {"report/test_revenue": 3.0}, 20)
    assert run.logged[-1] == {
        "report/test_revenue": 3.0,
        "stage2/step": 20,
        "report/table": ("table", ["a", "b"], [["1", "2"]]),
    }
    assert run.summary == {"report/test_revenue": 3.0, "report/summary": "summary"}
    tracker.close()
    assert run.finished


def test_wandb_that_cannot_start_is_a_user_error(monkeypatch, tmp_path):
    failing = _fake_wandb(fail=RuntimeError("api_key not configured (no-tty)\nmore"))
    monkeypatch.setitem(sys.modules, "wandb", failing)
    with pytest.raises(BundleflowError, match=r"api_key not configured.*wandb login") as err:
        tracking.open_tracker("wandb", tmp_path / "run", {})
    assert "\n" not in str(err.value)


def test_gpu_numbers_for_the_metrics_lines(monkeypatch):
    assert telemetry.gpu_metrics("cpu") == {}
    props = types.SimpleNamespace(name="NVIDIA H200", total_memory=140 << 30, uuid="")
    import torch

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda i: 3 << 30)
    monkeypatch.setattr(telemetry, "_nvml_sample", lambda i, uuid: (88, 6 << 30, 140 << 30))
    assert telemetry.gpu_metrics("cuda") == {
        "torch_peak_memory": 3.0,
        "gpu_memory_used": 6.0,
        "gpu_utilization": 88.0,
    }
    assert telemetry.gpu_status_line("cuda").startswith("GPU 0 NVIDIA H200: util 88%")
    monkeypatch.setattr(telemetry, "_nvml_sample", lambda i, uuid: None)
    assert telemetry.gpu_metrics("cuda") == {"torch_peak_memory": 3.0}
