"""The console script's contract: --version, help, exit codes."""

from __future__ import annotations

import pytest

from bundleflow import __version__
from bundleflow.cli.app import main
from tests.conftest import run_cli


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"bundleflow {__version__}"


def test_console_script_runs_as_module():
    out = run_cli("--version")
    assert out.returncode == 0 and __version__ in out.stdout


def test_no_command_is_a_usage_error(capsys):
    assert main([]) == 2


def test_unknown_flag_exits_2():
    with pytest.raises(SystemExit) as exc:
        main(["--no-such-flag"])
    assert exc.value.code == 2


# --------------------------------------------------------------------------- issue 25's edges

TINY_CPU = ["--preset", "tiny", "--device", "cpu", "--no-progress"]


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An isolated BUNDLEFLOW_HOME / BUNDLEFLOW_CACHE and working directory."""
    monkeypatch.setenv("BUNDLEFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("BUNDLEFLOW_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--max-steps", "0"], "--max-steps 0"),  # trained the whole schedule before
        (["--max-steps", "-5"], "--max-steps -5"),  # exited 0 after 0 steps before
        (["--max-time", "0"], "--max-time 0"),
        (["--max-time", "-1"], "--max-time -1"),
        (["--set", "stage2.max_time=-1"], "'stage2.max_time'"),
        (["--set", "stage2.max_time=0"], "'stage2.max_time'"),
        (["--set", "stage2.steps=0"], "'stage2.steps'"),
    ],
)
def test_step_and_time_budgets_of_zero_or_less_are_refused(home, capsys, flags, named):
    capsys.readouterr()
    assert main(["train", *TINY_CPU, "--runs-dir", str(home / "runs"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bundleflow: error: ") and named in err, err
    assert not (home / "runs").exists() or not any((home / "runs").iterdir())


def test_a_directory_as_data_is_named_as_a_directory(home, capsys):
    folder = home / "datasets"
    folder.mkdir()
    capsys.readouterr()
    assert main(["train", *TINY_CPU, "--runs-dir", str(home / "runs"), "--data", str(folder)]) == 2
    err = capsys.readouterr().err
    assert f"--data {folder}: is a directory" in err and "no such file" not in err, err


def test_train_prints_its_result_on_stdout_and_its_log_on_stderr(home, capsys):
    """`bundleflow train ... > result.txt` keeps the result (it all went to stderr)."""
    capsys.readouterr()
    assert main(["train", *TINY_CPU, "--runs-dir", str(home / "runs")]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("test revenue (hard, ") and "bundle-size pricing" in out
    assert "training wall time" in out and out.rstrip().splitlines()[-1].startswith("time: ")
    assert "test revenue (hard" not in err and "stage 2 done" in err
