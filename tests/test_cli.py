"""The console script's contract: --version, help, exit codes."""

from __future__ import annotations

import pytest

from bundleflow import __version__
from bundleflow.cli import main
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
