"""GPU telemetry for the training log: one cheap status line, without importing the doctor."""

from __future__ import annotations

import contextlib
import os


def gib(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**30:.1f} GiB"


def _gpu_sample(device) -> dict | None:
    """index, name, total and torch-peak memory, and NVML's (utilisation %, used, total) of
    a CUDA device; None off CUDA or when torch cannot say. Never raises."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return None
    try:
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        peak = torch.cuda.max_memory_allocated(index)
    except Exception:  # noqa: BLE001
        return None
    uuid = str(getattr(props, "uuid", "") or "")
    return {"index": index, "props": props, "peak": peak, "nvml": _nvml_sample(index, uuid)}


def gpu_status_line(device) -> str | None:
    """``GPU 0 NVIDIA H100 80GB HBM3: util 97%, memory 12.3/79.6 GiB (torch peak 9.8 GiB)``
    for a CUDA device, None otherwise. Never raises; the trainers log it at the validation
    (Stage 2) or progress-line (Stage 1) cadence."""
    sample = _gpu_sample(device)
    if sample is None:
        return None
    props, peak, nvml = sample["props"], sample["peak"], sample["nvml"]
    text = f"GPU {sample['index']} {props.name}: "
    if nvml is None:
        return text + f"util ?, memory ?/{gib(props.total_memory)} (torch peak {gib(peak)})"
    util, used, total = nvml
    shown_util = "?" if util is None else f"{util}%"
    return text + (
        f"util {shown_util}, memory {used / 2**30:.1f}/{total / 2**30:.1f} GiB "
        f"(torch peak {gib(peak)})"
    )


def gpu_metrics(device) -> dict[str, float]:
    """The numbers of :func:`gpu_status_line` for ``metrics.jsonl``: ``gpu_utilization`` (%),
    ``gpu_memory_used`` and ``torch_peak_memory`` (GiB), those known; {} off CUDA."""
    sample = _gpu_sample(device)
    if sample is None:
        return {}
    out = {"torch_peak_memory": sample["peak"] / 2**30}
    if sample["nvml"] is not None:
        util, used, _ = sample["nvml"]
        out["gpu_memory_used"] = used / 2**30
        if util is not None:
            out["gpu_utilization"] = float(util)
    return out


def _nvml_sample(torch_index: int, uuid: str) -> tuple[int | None, int, int] | None:
    """(utilisation %, memory used, memory total) of the NVML GPU behind a torch index."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001
        return None
    try:
        handle = nvml_handle(pynvml, torch_index, uuid)
        mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
        util = None
        with contextlib.suppress(Exception):
            util = int(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        return util, int(mem.used), int(mem.total)
    except Exception:  # noqa: BLE001
        return None
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()


def nvml_handle(pynvml, torch_index: int, uuid: str):
    """torch numbers GPUs after CUDA_VISIBLE_DEVICES; NVML does not. Match by UUID, else
    map the index through CUDA_VISIBLE_DEVICES."""
    if uuid:
        with contextlib.suppress(Exception):
            want = uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"
            return pynvml.nvmlDeviceGetHandleByUUID(want)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        entries = [e.strip() for e in visible.split(",")]
        if torch_index < len(entries):
            entry = entries[torch_index]
            if entry.isdigit():
                return pynvml.nvmlDeviceGetHandleByIndex(int(entry))
            return pynvml.nvmlDeviceGetHandleByUUID(entry)
    return pynvml.nvmlDeviceGetHandleByIndex(torch_index)


def driver_version() -> str | None:
    """The NVIDIA driver's version through NVML, or None (no NVML, no driver)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - not installed, library not found, driver not loaded
        return None
    try:
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:  # noqa: BLE001
        return None
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()
