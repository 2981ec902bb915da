"""Choosing the device, loudly: no silent CPU fallback when a GPU exists but is unusable."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from bundleflow.errors import BundleflowError


@dataclass(frozen=True)
class DeviceChoice:
    device: torch.device
    reason: str


def nvml_gpu_count() -> int | None:
    """NVIDIA GPUs the driver sees (NVML), or None when there is no driver/NVML."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - NVMLError_LibraryNotFound, DriverNotLoaded, ...
        return None
    try:
        return int(pynvml.nvmlDeviceGetCount())
    except Exception:  # noqa: BLE001
        return None
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()


def torch_build_summary() -> str:
    cuda = torch.version.cuda or "none (CPU-only wheel)"
    return (
        f"torch {torch.__version__}, CUDA build {cuda}, "
        f"torch.cuda.is_available()={torch.cuda.is_available()}"
    )


def cuda_unusable_cause() -> str:
    """The most likely reason torch cannot use CUDA here, with the fix."""
    if torch.version.cuda is None:
        return (
            f"torch {torch.__version__} is a CPU-only build; reinstall a CUDA build, e.g. "
            "pip install torch==2.5.1 --index-url https://download.pytorch.org/whl/cu121"
        )
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU; unset or fix it"
    count = nvml_gpu_count()
    if count is None:
        return (
            "no NVIDIA driver is visible (NVML not found); in a container start it with GPUs "
            "(--gpus all / the compose device reservation)"
        )
    if count == 0:
        return "the NVIDIA driver sees no GPU"
    return (
        f"NVML sees {count} GPU(s) but CUDA does not initialise (driver older than the wheel's "
        f"CUDA {torch.version.cuda}, or a container without the compute capability)"
    )


def resolve_device(request: str) -> DeviceChoice:
    """``auto`` -> CUDA, else MPS, else CPU (CPU only when no NVIDIA GPU is visible at all)."""
    if request == "cpu":
        return DeviceChoice(torch.device("cpu"), "requested --device cpu")
    if request == "cuda":
        if torch.cuda.is_available():
            return DeviceChoice(torch.device("cuda"), f"requested: {torch.cuda.get_device_name()}")
        raise BundleflowError(
            f"--device cuda, but no usable CUDA GPU: {cuda_unusable_cause()} "
            f"[{torch_build_summary()}]"
        )
    if request == "mps":
        if torch.backends.mps.is_available():
            return DeviceChoice(torch.device("mps"), "requested --device mps")
        raise BundleflowError("--device mps, but MPS is not available on this machine")
    if request != "auto":
        raise BundleflowError(f"--device {request!r}: use auto, cuda, mps or cpu")
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        return DeviceChoice(torch.device("cuda"), f"auto: CUDA is available ({name})")
    gpus = nvml_gpu_count()
    if gpus:
        raise BundleflowError(
            f"--device auto: the driver sees {gpus} NVIDIA GPU(s) but torch cannot use them: "
            f"{cuda_unusable_cause()} [{torch_build_summary()}]; pass --device cpu to run on "
            "the CPU anyway"
        )
    if torch.backends.mps.is_available():
        return DeviceChoice(torch.device("mps"), "auto: no CUDA GPU; Apple MPS is available")
    return DeviceChoice(
        torch.device("cpu"), f"auto: no NVIDIA GPU visible and no MPS [{torch_build_summary()}]"
    )
