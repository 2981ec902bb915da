"""A run is a record (issue 15): `--resume RUN` trains on what the run was started with.

Each test here failed on the code before the record existed: a resumed `--data` run trained
on the preset's generated data; `--max-steps` was forgotten; Ctrl-C in Stage 1 kept nothing;
a `--data` file with another m than the preset's was refused; `accelerate launch` with the
shipped configs turned the CUDA default (bf16 flow network, compiled kernels) off.
"""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from bundleflow.cli.app import main
from bundleflow.maths.fused import resolve_kernels
from bundleflow.train import stage1 as stage1_module
from bundleflow.train.config import FlowConfig, Stage1Config
from bundleflow.train.plan import stage2_precision
from bundleflow.train.stage1 import Stage1Stopped, train_stage1
from bundleflow.valuations.io import generate_dataset
from tests.conftest import (
    REPO,
    isolated_bundleflow_home,
    run_cli,
    single_torch_thread,
    start_cli,
)

M = 6  # configs/tiny.yaml's m
FILE_M = 5  # the --data files' m: not the preset's, so m must come from the file
CPU = ["--preset", "tiny", "--device", "cpu", "--no-progress"]


def _sets(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    yield from single_torch_thread()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    yield from isolated_bundleflow_home(tmp_path_factory, "bf-record")


@pytest.fixture(scope="module")
def data_file(env) -> Path:
    return generate_dataset(env / "regions5.safetensors", "regions", FILE_M, 400, seed=3)


def _only_run(runs: Path) -> Path:
    found = [p for p in runs.iterdir() if p.is_dir()]
    assert len(found) == 1, found
    return found[0]


def _info(run: Path) -> dict:
    return json.loads((run / "run.json").read_text())


def _stage2_steps(run: Path) -> list[int]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return [r["step"] for r in records if r.get("stage") == 2 and "soft_revenue" in r]


def _interrupt_after(cmd: list[str], ready, sig=signal.SIGINT) -> subprocess.CompletedProcess:
    """Run the CLI in a subprocess, send ``sig`` once ``ready()`` holds; its output."""
    proc = start_cli(*cmd)
    deadline = time.monotonic() + 120
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"not interrupted in time: {proc.communicate()[1][-2000:]}")
        time.sleep(0.02)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


# --------------------------------------------------------------------------- --data


def test_data_file_sets_m_and_a_resumed_run_reads_the_same_file(env, data_file, capsys):
    """`--data` with m=5 under a preset with m=6 trains (m from the file); the resumed run
    reads that file again (not the preset's generated set) and its report is on it."""
    runs = env / "runs-data"
    argv = ["train", *CPU, "--runs-dir", str(runs), "--data", str(data_file)]
    assert main([*argv, "--max-steps", "10"]) == 0
    run = _only_run(runs)
    info = _info(run)
    assert info["data"]["path"] == str(data_file.resolve())
    assert info["launch"]["data"] == str(data_file.resolve())
    sha = info["data"]["sha256"]
    assert info["launch"]["data_sha256"] == sha and info["launch"]["max_steps"] == 10
    assert info["config"]["data"]["n_items"] == FILE_M
    capsys.readouterr()

    # Resume with no flags at all: the same file, the recorded --max-steps (done at 10).
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "generating data set" not in err
    assert not (env / "cache" / "datasets").exists()  # nothing generated, ever
    assert _info(run)["data"]["sha256"] == sha
    assert json.loads((run / "report.json").read_text())["stage2"]["steps"] == 10


def test_resume_refuses_a_changed_or_different_data_file(env, data_file, tmp_path, capsys):
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(data_file.read_bytes())
    runs = env / "runs-data-changed"
    argv = ["train", *CPU, "--runs-dir", str(runs), "--data", str(copy)]
    assert main([*argv, "--max-steps", "5"]) == 0
    run = _only_run(runs)
    capsys.readouterr()

    other = generate_dataset(tmp_path / "other.safetensors", "arbitrary", FILE_M, 400, seed=4)
    assert main(["train", "--resume", str(run), "--data", str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "--data" in err and str(other) in err and str(copy) in err

    copy.write_bytes(other.read_bytes())  # the file itself changed under the run
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert str(copy) in err and "changed" in err

    copy.unlink()
    assert main(["train", "--resume", str(run)]) == 2
    assert "gone" in capsys.readouterr().err


def test_a_flag_that_contradicts_the_record_stops_naming_both(env, data_file, capsys):
    runs = env / "runs-contradict"
    argv = ["train", *CPU, "--runs-dir", str(runs), "--data", str(data_file)]
    assert main([*argv, "--max-steps", "5"]) == 0
    run = _only_run(runs)
    capsys.readouterr()
    cases = [
        (["--max-steps", "7"], ["--max-steps 7", "--max-steps 5"]),
        (["--set", "stage2.lr=0.5"], ["stage2.lr=0.5", "stage2.lr=0.3"]),
        (["--preset", "paper-m50"], ["--preset paper-m50", "--preset tiny"]),
        (["--mixed-precision", "bf16"], ["--mixed-precision bf16", "--mixed-precision None"]),
    ]
    for flags, named in cases:
        assert main(["train", "--resume", str(run), *flags]) == 2, flags
        err = capsys.readouterr().err
        for text in named:
            assert text in err, (flags, err)
    # The same flags again agree with the record.
    assert main(["train", "--resume", str(run), *CPU, "--max-steps", "5"]) == 0


# --------------------------------------------------------------------------- --max-steps


def test_max_steps_survives_ctrl_c_and_resume(env):
    """`--max-steps N`, Ctrl-C, `--resume RUN`: the run stops at N (it ran to
    stage2.steps before)."""
    runs = env / "runs-max-steps"
    sets = _sets(["stage2.steps=100000"])
    cmd = ["train", *CPU, "--runs-dir", str(runs), *sets, "--max-steps", "400"]

    def checkpointed() -> bool:
        return bool(list(runs.glob("*/checkpoints/step-*/manifest.json")))

    out = _interrupt_after(cmd, checkpointed)
    assert out.returncode == 0, out.stderr
    run = _only_run(runs)
    stopped = max(_stage2_steps(run) or [0])
    assert stopped < 400, "the run finished before it was interrupted; use more steps"
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    report = json.loads((run / "report.json").read_text())
    assert report["stage2"]["steps"] == 400
    assert max(_stage2_steps(run)) == 400


@pytest.fixture(scope="module")
def interrupted_then_resumed(env):
    """A run stopped by Ctrl-C in Stage 2 (under a directory whose name has a space), then
    resumed with the command its hint printed, pasted as is."""
    runs = env / "runs with space"
    sets = _sets(["stage2.steps=100000"])
    cmd = ["train", *CPU, "--runs-dir", str(runs), *sets, "--max-steps", "300"]

    def checkpointed() -> bool:
        return bool(list(runs.glob("*/checkpoints/step-*/manifest.json")))

    out = _interrupt_after(cmd, checkpointed)
    assert out.returncode == 0, out.stderr
    run = _only_run(runs)
    stopped = _info(run)
    hint = [line for line in out.stderr.splitlines() if "resume with: " in line][-1]
    pasted = shlex.split(hint.split("resume with: ", 1)[1])
    resumed = run_cli(*pasted[1:], env={"OMP_NUM_THREADS": "1"})  # `bundleflow` = -m bundleflow
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return run, pasted, stopped


def test_the_interrupt_hint_is_a_command_to_paste(interrupted_then_resumed):
    """It was a fragment ("resume with --resume DIR") and broke on a path with a space."""
    run, pasted, _ = interrupted_then_resumed
    assert pasted == ["bundleflow", "train", "--resume", str(run), "--no-progress"]
    report = json.loads((run / "report.json").read_text())
    assert report["stage2"]["steps"] == 300  # the pasted command restored --max-steps


def test_a_resumed_runs_wall_time_includes_every_session(interrupted_then_resumed):
    """The report's wall time was the last session's alone."""
    run, _, stopped = interrupted_then_resumed
    (first,) = stopped["segments"]
    assert first["end"] == "stopped" and first["wall_time"] > 0
    segments = _info(run)["segments"]
    assert [s["end"] for s in segments] == ["stopped", "finished"] and segments[0] == first
    report = json.loads((run / "report.json").read_text())
    assert report["segments"] == segments
    assert report["wall_time"] == pytest.approx(sum(s["wall_time"] for s in segments))
    assert report["wall_time"] > segments[-1]["wall_time"]


# --------------------------------------------------------------------------- Stage 1


class _StopAt:
    """Stands in for StopRequest: 'a signal arrives' once the loop has asked ``at`` times."""

    def __init__(self, at: int) -> None:
        self.at, self.asked = at, 0

    def __call__(self):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    @property
    def requested(self) -> bool:
        self.asked += 1
        return self.asked >= self.at


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_stage1_stopped_and_resumed_is_the_uninterrupted_flow_bit_for_bit(
    tmp_path, monkeypatch, schedule
):
    flow = FlowConfig(hidden=16)
    cfg = Stage1Config(
        steps=30, batch_size=64, lr_schedule=schedule, checkpoint_every=4, log_every=5
    )
    cpu = torch.device("cpu")
    straight, noise, _ = train_stage1(M, flow, cfg, cpu, show_progress=False)

    monkeypatch.setattr(stage1_module, "StopRequest", _StopAt(13))
    with pytest.raises(Stage1Stopped) as stopped:
        train_stage1(M, flow, cfg, cpu, show_progress=False, checkpoint_dir=tmp_path)
    assert stopped.value.step == 13
    assert [p.name for p in tmp_path.iterdir()] == ["step-000000013"]
    monkeypatch.undo()
    resumed, resumed_noise, summary = train_stage1(
        M, flow, cfg, cpu, show_progress=False, checkpoint_dir=tmp_path, resume=True
    )
    assert summary["steps"] == 30
    resumed_state = resumed.state_dict()
    for name, value in straight.state_dict().items():
        assert torch.equal(value, resumed_state[name]), name
    assert torch.equal(noise.means, resumed_noise.means)


def test_stage1_checkpoint_of_another_config_is_refused(tmp_path):
    cpu = torch.device("cpu")
    flow = FlowConfig(hidden=16)
    cfg = Stage1Config(steps=4, batch_size=32, checkpoint_every=2)
    train_stage1(M, flow, cfg, cpu, show_progress=False, checkpoint_dir=tmp_path)
    other = Stage1Config(steps=4, batch_size=32, checkpoint_every=2, lr=0.1)
    from bundleflow.errors import BundleflowError

    with pytest.raises(BundleflowError, match="another flow or Stage-1 config"):
        train_stage1(M, flow, other, cpu, show_progress=False, checkpoint_dir=tmp_path, resume=True)


def test_ctrl_c_in_stage1_keeps_a_checkpoint_and_resume_continues_there(env):
    runs = env / "runs-stage1-ctrl-c"
    sets = _sets(["stage1.steps=3000", "stage1.batch_size=64", "stage1.checkpoint_every=10"])
    cmd = ["train", *CPU, "--runs-dir", str(runs), *sets]

    def stage1_checkpointed() -> bool:
        return bool(list(runs.glob("*/stage1/step-*/manifest.json")))

    out = _interrupt_after(cmd, stage1_checkpointed)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    assert "stopped by a signal in stage 1" in out.stderr and "--resume" in out.stderr
    run = _only_run(runs)
    kept = sorted((run / "stage1").iterdir())
    assert len(kept) == 1
    step = int(kept[0].name.removeprefix("step-"))
    assert 0 < step < 3000
    assert not (run / "checkpoints").exists()

    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    log = (run / "train.log").read_text()
    assert f"stage 1: resumed from {kept[0]} (step {step})" in log
    assert (run / "report.json").is_file()
    assert _info(run)["flow"]["steps"] == 3000


# --------------------------------------------------------------------------- precision


def _accelerate_launch_env(config_file: Path, *extra: str) -> dict[str, str]:
    """The environment `accelerate launch --config_file FILE [extra] -m bundleflow train`
    gives its process, computed by accelerate's own launcher code."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env, prepare_simple_launcher_cmd_env

    parser = launch_command_parser()
    args = parser.parse_args(["--config_file", str(config_file), *extra, "-m", "bundleflow"])
    args = _validate_launch_command(args)[0]
    if args.multi_gpu:
        return prepare_multi_gpu_env(args)
    return prepare_simple_launcher_cmd_env(args)[1]


@pytest.mark.parametrize("name", ["single_gpu", "multi_gpu"])
def test_shipped_accelerate_configs_keep_the_cuda_default(name, monkeypatch):
    """Launched through the shipped configs, Stage 2 on CUDA keeps bf16 and compiled kernels;
    an explicit --mixed_precision on the launcher or bundleflow's flag still wins."""
    config = REPO / "configs" / "accelerate" / f"{name}.yaml"
    cuda = torch.device("cuda")
    env = _accelerate_launch_env(config)
    assert "ACCELERATE_MIXED_PRECISION" in env  # accelerate always exports it
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", env["ACCELERATE_MIXED_PRECISION"])
    precision, source = stage2_precision(None, cuda)
    assert precision == "bf16", source
    assert "not a choice" in source
    assert resolve_kernels("auto", cuda, precision in ("bf16", "fp16")) == "compiled"
    assert stage2_precision("no", cuda) == ("no", "bundleflow mixed_precision")

    chosen = _accelerate_launch_env(config, "--mixed_precision", "fp16")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", chosen["ACCELERATE_MIXED_PRECISION"])
    assert stage2_precision(None, cuda) == ("fp16", "accelerate (ACCELERATE_MIXED_PRECISION)")
