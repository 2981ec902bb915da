"""Choosing the device, loudly: no silent CPU fallback when a GPU exists but is unusable."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch

from bundleflow.errors import BundleflowError
from bundleflow.system.diagnosis import diagnose, gpu_visible
from bundleflow.system.doctor import Facts, gather, probe_env
from bundleflow.system.doctor_checks import FAIL, check_arch

CUDA_INDEX = re.compile(r"cuda:(\d+)")
"""``--device cuda:N``: GPU N of those torch sees (after CUDA_VISIBLE_DEVICES)."""
DETAILS = "(details: bundleflow doctor)"


@dataclass(frozen=True)
class DeviceChoice:
    device: torch.device
    reason: str


def torch_build_summary() -> str:
    cuda = torch.version.cuda or "none (CPU-only wheel)"
    return (
        f"torch {torch.__version__}, CUDA build {cuda}, "
        f"torch.cuda.is_available()={torch.cuda.is_available()}"
    )


def cuda_unusable_message(flag: str, facts: Facts) -> str:
    """Two lines: why ``flag`` cannot use CUDA here, and the fix (the doctor's finding)."""
    if not facts.nvml.ok and not facts.dev_nvidia:
        # No driver and no GPU: reinstalling torch alone would not help, whatever its build.
        cpu_wheel = facts.torch.cuda is None and not facts.torch.hip
        build = f"; torch {facts.torch.version} is a CPU-only build" if cpu_wheel else ""
        if facts.container:
            return (
                f"{flag}: no NVIDIA GPU in this container (no /dev/nvidia*, no driver){build}\n"
                "fix: use --device cpu, or start the container with GPUs (docker run --gpus "
                f"all, or compose's device reservation) {DETAILS}"
            )
        return (
            f"{flag}: no NVIDIA GPU or driver on this machine{build}\n"
            f"fix: use --device cpu (or auto), or run on a GPU machine {DETAILS}"
        )
    finding = diagnose(facts)
    if finding is None:  # torch.cuda.is_available() said no, the doctor's probe said yes
        return (
            f"{flag}: torch.cuda.is_available() is False\nfix: compare "
            f"`python -m torch.utils.collect_env` with `nvidia-smi` {DETAILS}"
        )
    if flag == "--device auto":  # a GPU is there: no silent CPU fallback
        cause = f"torch cannot use the GPU: {finding.cause}"
        return f"{flag}: {cause}\nfix: {finding.fix} (or --device cpu)"
    return f"{flag}: {finding.cause}\nfix: {finding.fix}"


def resolve_device(request: str) -> DeviceChoice:
    """``auto`` -> CUDA, else MPS, else CPU (CPU only when no NVIDIA GPU is visible at all);
    ``cuda:N`` -> GPU N (made the current device, so accelerate's ``cuda`` is that GPU)."""
    if request == "cpu":
        return DeviceChoice(torch.device("cpu"), "requested --device cpu")
    if request == "cuda" or CUDA_INDEX.fullmatch(request):
        flag = f"--device {request}"
        if not torch.cuda.is_available():
            raise BundleflowError(cuda_unusable_message(flag, gather(launcher=False)))
        _refuse_missing_arch(flag)
        if request == "cuda":
            return DeviceChoice(torch.device("cuda"), f"requested: {torch.cuda.get_device_name()}")
        index = _gpu_index(request)
        torch.cuda.set_device(index)
        name = torch.cuda.get_device_name(index)
        return DeviceChoice(torch.device("cuda", index), f"requested: GPU {index} ({name})")
    if request == "mps":
        if torch.backends.mps.is_available():
            return DeviceChoice(torch.device("mps"), "requested --device mps")
        raise BundleflowError(
            "--device mps: Apple MPS is not available on this machine\nfix: use --device cpu"
        )
    if request != "auto":
        raise BundleflowError(
            f"--device {request!r}: not a device\nfix: use auto, cuda, cuda:N (N a GPU index), "
            "mps or cpu"
        )
    if torch.cuda.is_available():
        _refuse_missing_arch("--device auto")
        name = torch.cuda.get_device_name()
        return DeviceChoice(torch.device("cuda"), f"auto: CUDA is available ({name})")
    facts = gather(launcher=False)
    if gpu_visible(facts):
        raise BundleflowError(cuda_unusable_message("--device auto", facts))
    if torch.backends.mps.is_available():
        return DeviceChoice(torch.device("mps"), "auto: no CUDA GPU; Apple MPS is available")
    return DeviceChoice(
        torch.device("cpu"), f"auto: no NVIDIA GPU visible and no MPS [{torch_build_summary()}]"
    )


def _gpu_index(request: str) -> int:
    """N of ``cuda:N``, checked against the GPUs torch sees and the launch."""
    index = int(CUDA_INDEX.fullmatch(request)[1])
    count = torch.cuda.device_count()
    if index >= count:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        after = f" (after CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
        valid = "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
        raise BundleflowError(
            f"--device {request}: torch sees {count} GPU(s){after}\n"
            f"fix: use {valid} (`nvidia-smi -L` lists the GPUs)"
        )
    processes = probe_env().get("WORLD_SIZE") or "1"  # set by accelerate launch / torchrun
    if processes.isdigit() and int(processes) > 1:
        # The launcher gives each process its own GPU; one index for all would be ignored.
        raise BundleflowError(
            f"--device {request}: this is one of {processes} launched processes, each with "
            "its own GPU\nfix: use --device cuda and choose the GPUs with CUDA_VISIBLE_DEVICES"
        )
    return index


def _refuse_missing_arch(flag: str) -> None:
    """CUDA initialises, but the wheel has no kernels for this GPU: the first kernel would
    fail with "no kernel image is available", so stop now with the doctor's finding."""
    verdict = check_arch(gather(launcher=False))
    if verdict.status == FAIL:
        raise BundleflowError(f"{flag}: {verdict.value}\nfix: {verdict.fix}")
