"""User errors say what is wrong and the fix in one or two lines (issue 15, item 9):
``--device cuda``/``cuda:N``, run directories for evaluate / menu show / menu query."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from bundleflow.cli.app import build_parser, main
from bundleflow.cli.evaluate import run_dir_arg
from bundleflow.errors import BundleflowError
from bundleflow.system import devices
from bundleflow.system.doctor import NvmlFacts
from bundleflow.train.config import load_config
from tests.test_doctor import h100_facts, unusable

MAX_LINE = 160  # "one or two lines" a terminal shows without wrapping twice


def short(message: str) -> list[str]:
    lines = message.splitlines()
    assert 1 <= len(lines) <= 2, message
    assert all(len(line) <= MAX_LINE for line in lines), message
    return lines


# --------------------------------------------------------------------------- --device cuda


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


def cpu_wheel(facts, version="2.13.0+cpu"):
    return unusable(facts, cuda=None, version=version, compiled=False, arch_list=[])


@pytest.mark.parametrize("container", [[], ["/.dockerenv"]])
def test_cuda_on_a_machine_without_a_gpu_says_so_and_suggests_the_cpu(
    monkeypatch, no_cuda, container
):
    """This CPU machine: no driver, no GPU, a CPU wheel. Reinstalling torch would not help."""
    facts = cpu_wheel(
        h100_facts(nvml=NvmlFacts(ok=False, error="NVMLError_LibraryNotFound"), dev_nvidia=[])
    )
    monkeypatch.setattr(devices, "gather", lambda **k: replace(facts, container=container))
    with pytest.raises(BundleflowError) as err:
        devices.resolve_device("cuda")
    what, fix = short(str(err.value))
    assert what.startswith("--device cuda: no NVIDIA GPU") and "2.13.0+cpu" in what
    assert fix.startswith("fix: use --device cpu") and "bundleflow doctor" in fix
    assert "pip install" not in str(err.value)  # the old text downgraded torch to 2.5.1
    assert ("--gpus all" in fix) == bool(container)


def test_cpu_wheel_on_a_gpu_machine_keeps_the_installed_torch_version(monkeypatch, no_cuda):
    monkeypatch.setattr(devices, "gather", lambda **k: cpu_wheel(h100_facts()))  # driver 12.4
    with pytest.raises(BundleflowError) as err:
        devices.resolve_device("cuda")
    what, fix = short(str(err.value))
    assert (
        what == "--device cuda: torch 2.13.0+cpu is a CPU-only wheel (torch.version.cuda is None)"
    )
    # no flavour of 2.13 is as old as the 12.4 driver: the oldest (cu126, minor-version
    # compatibility); never the image's torch==2.5.1
    assert "install torch==2.13.0+cu126 --index-url https://download.pytorch.org/whl/cu126" in fix
    assert "2.5.1" not in fix


def test_auto_with_an_unusable_gpu_stops_with_the_finding(monkeypatch, no_cuda):
    old_driver = unusable(h100_facts(nvml=replace(h100_facts().nvml, cuda_driver=11080)))
    monkeypatch.setattr(devices, "gather", lambda **k: old_driver)
    with pytest.raises(BundleflowError) as err:
        devices.resolve_device("auto")
    what, fix = short(str(err.value))
    assert what.startswith("--device auto: torch cannot use the GPU: the driver supports CUDA 11.8")
    assert "upgrade the NVIDIA driver (>= 530.30.02)" in fix and fix.endswith("(or --device cpu)")


def test_unknown_device_lists_cuda_n(no_cuda):
    with pytest.raises(BundleflowError) as err:
        devices.resolve_device("gpu")
    assert "cuda:N" in short(str(err.value))[-1]


# --------------------------------------------------------------------------- --device cuda:N


@pytest.fixture
def two_gpus(monkeypatch):
    """torch sees two H100s (the arch check passes); set_device calls are recorded."""
    two = replace(h100_facts().torch, device_count=2, devices=h100_facts().torch.devices * 2)
    monkeypatch.setattr(devices, "gather", lambda **k: h100_facts(torch=two))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: f"NVIDIA H100 #{i}")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    return calls


def test_cuda_n_uses_that_gpu(two_gpus):
    choice = devices.resolve_device("cuda:1")
    assert choice.device == torch.device("cuda", 1)
    assert two_gpus == [1]  # accelerate's plain "cuda" is then GPU 1
    assert "GPU 1" in choice.reason and "#1" in choice.reason


def test_cuda_n_out_of_range_names_the_count(two_gpus, monkeypatch):
    with pytest.raises(BundleflowError) as err:
        devices.resolve_device("cuda:2")
    what, fix = short(str(err.value))
    assert what == "--device cuda:2: torch sees 2 GPU(s)"
    assert "cuda:0 to cuda:1" in fix
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(BundleflowError) as err:
        devices.resolve_device("cuda:5")
    assert "after CUDA_VISIBLE_DEVICES='0,1'" in str(err.value)
    assert two_gpus == []


def test_cuda_n_under_a_multi_process_launch_is_refused(two_gpus, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(BundleflowError) as err:
        devices.resolve_device("cuda:1")
    assert "CUDA_VISIBLE_DEVICES" in short(str(err.value))[1]
    assert devices.resolve_device("cuda").device == torch.device("cuda")


def test_cuda_n_without_cuda_gives_the_doctor_finding(monkeypatch, no_cuda):
    monkeypatch.setattr(devices, "gather", lambda **k: cpu_wheel(h100_facts()))
    with pytest.raises(BundleflowError) as err:
        devices.resolve_device("cuda:1")
    assert short(str(err.value))[0].startswith("--device cuda:1: torch 2.13.0+cpu")


@pytest.mark.parametrize("device", ["cuda:0", "cuda:1", "cuda:12"])
def test_config_accepts_cuda_n(device):
    assert load_config(None, {"device": device}).device == device


@pytest.mark.parametrize("device", ["gpu", "cuda:", "cuda:x", "cuda:-1", "cuda 1"])
def test_config_rejects_other_devices_and_names_cuda_n(device):
    with pytest.raises(BundleflowError) as err:
        load_config(None, {"device": device})
    assert "'device'" in str(err.value) and "cuda:N" in str(err.value)


# --------------------------------------------------------------------------- run directories

RUN_COMMANDS = [["evaluate"], ["menu", "show"], ["menu", "query"]]


@pytest.fixture
def runs_home(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BUNDLEFLOW_HOME", raising=False)
    (tmp_path / "runs").mkdir()
    return tmp_path


@pytest.mark.parametrize("command", RUN_COMMANDS)
@pytest.mark.parametrize("style", ["positional", "flag"])
def test_a_missing_run_directory_says_so(runs_home, capsys, command, style):
    where = ["runs/nosuch"] if style == "positional" else ["--run", "runs/nosuch"]
    assert main([*command, *where]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        "bundleflow: error: runs/nosuch: no such run directory; `ls runs` lists the runs"
    )


@pytest.mark.parametrize("command", RUN_COMMANDS)
def test_a_directory_that_is_no_run_says_so(runs_home, capsys, command):
    (runs_home / "notes").mkdir()
    assert main([*command, "notes"]) == 2
    err = capsys.readouterr().err
    assert "notes: not a bundleflow run directory (no run.json); `ls runs` lists the runs" in err
    assert "Stage 2" not in err


@pytest.mark.parametrize("command", RUN_COMMANDS)
def test_a_run_without_a_menu_says_to_resume(runs_home, capsys, command):
    run = runs_home / "runs" / "default-1"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"config": {}}))
    assert main([*command, str(run)]) == 2
    err = capsys.readouterr().err
    assert "has not finished Stage 2" in err and f"bundleflow train --resume {run}" in err


def test_without_any_runs_the_message_says_there_are_none(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BUNDLEFLOW_HOME", str(tmp_path / "home"))
    assert main(["menu", "show", "runs/nosuch"]) == 2
    assert f"no runs in {tmp_path / 'home' / 'runs'} yet" in capsys.readouterr().err


@pytest.mark.parametrize("command", RUN_COMMANDS)
def test_run_dir_positional_or_flag(command):
    parser = build_parser()
    extra = ["--data", "x.pt"] if command[-1] == "query" else []
    for argv in (["r1"], ["--run", "r1"], ["r1", "--run", "r1"]):
        assert run_dir_arg(parser.parse_args([*command, *argv, *extra])) == Path("r1")
    with pytest.raises(BundleflowError, match="two run directories"):
        run_dir_arg(parser.parse_args([*command, "r1", "--run", "r2"]))
    with pytest.raises(BundleflowError, match="pass RUN_DIR or --run RUN_DIR"):
        run_dir_arg(parser.parse_args([*command, *extra]))
