"""Choosing the device, loudly: no silent CPU fallback when a GPU exists but is unusable."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bundleflow.doctor import FAIL, Facts, check_arch, diagnose, gather, gpu_visible
from bundleflow.errors import BundleflowError


@dataclass(frozen=True)
class DeviceChoice:
    device: torch.device
    reason: str


def nvml_gpu_count() -> int | None:
    """NVIDIA GPUs the driver sees (NVML), or None when there is no driver/NVML."""
    from bundleflow.doctor import probe_nvml

    nvml = probe_nvml()
    return len(nvml.gpus) if nvml.ok else None


def torch_build_summary() -> str:
    cuda = torch.version.cuda or "none (CPU-only wheel)"
    return (
        f"torch {torch.__version__}, CUDA build {cuda}, "
        f"torch.cuda.is_available()={torch.cuda.is_available()}"
    )


def doctor_finding(facts: Facts | None = None) -> str | None:
    """The doctor's verdict on why torch cannot use CUDA here (with its fix), or None."""
    facts = facts or gather(launcher=False)
    finding = diagnose(facts)
    if finding is None:
        return None
    return f"doctor: FAIL {finding.check}: {finding.cause}; fix: {finding.fix}"


def cuda_unusable_cause() -> str:
    """The most likely reason torch cannot use CUDA here, with the fix (the doctor's words)."""
    return doctor_finding() or "torch.cuda.is_available() is False for an unknown reason"


def _arch_problem(facts: Facts) -> str | None:
    verdict = check_arch(facts)
    if verdict.status != FAIL:
        return None
    return f"doctor: FAIL arch: {verdict.value}; fix: {verdict.fix}"


def resolve_device(request: str) -> DeviceChoice:
    """``auto`` -> CUDA, else MPS, else CPU (CPU only when no NVIDIA GPU is visible at all)."""
    if request == "cpu":
        return DeviceChoice(torch.device("cpu"), "requested --device cpu")
    if request == "cuda":
        if torch.cuda.is_available():
            _refuse_missing_arch("--device cuda")
            return DeviceChoice(torch.device("cuda"), f"requested: {torch.cuda.get_device_name()}")
        raise BundleflowError(
            f"--device cuda, but no usable CUDA GPU: {cuda_unusable_cause()} "
            f"[{torch_build_summary()}]; details: bundleflow doctor"
        )
    if request == "mps":
        if torch.backends.mps.is_available():
            return DeviceChoice(torch.device("mps"), "requested --device mps")
        raise BundleflowError("--device mps, but MPS is not available on this machine")
    if request != "auto":
        raise BundleflowError(f"--device {request!r}: use auto, cuda, mps or cpu")
    if torch.cuda.is_available():
        _refuse_missing_arch("--device auto")
        name = torch.cuda.get_device_name()
        return DeviceChoice(torch.device("cuda"), f"auto: CUDA is available ({name})")
    facts = gather(launcher=False)
    if gpu_visible(facts):
        gpus = len(facts.nvml.gpus) or "an"
        raise BundleflowError(
            f"--device auto: the driver sees {gpus} NVIDIA GPU(s) but torch cannot use them: "
            f"{doctor_finding(facts)} [{torch_build_summary()}]; pass --device cpu to run on "
            "the CPU anyway; details: bundleflow doctor"
        )
    if torch.backends.mps.is_available():
        return DeviceChoice(torch.device("mps"), "auto: no CUDA GPU; Apple MPS is available")
    return DeviceChoice(
        torch.device("cpu"), f"auto: no NVIDIA GPU visible and no MPS [{torch_build_summary()}]"
    )


def _refuse_missing_arch(flag: str) -> None:
    """CUDA initialises, but the wheel has no kernels for this GPU: the first kernel would
    fail with "no kernel image is available", so stop now with the doctor's finding."""
    problem = _arch_problem(gather(launcher=False))
    if problem:
        raise BundleflowError(f"{flag}: {problem} [{torch_build_summary()}]")
