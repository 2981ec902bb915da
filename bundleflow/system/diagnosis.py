"""What the doctor's facts mean, and the one cause that stops torch from using CUDA.

:func:`diagnose` names that cause (in the order a user should fix them) with its fix, in the
words of the environment spec's table "What GPU not used looks like"; the doctor's checks
(bundleflow.system.doctor_checks) and the trainer's ``--device`` errors (bundleflow.system.devices)
quote it. The fix texts that name a torch build or an NVIDIA driver come from
bundleflow.system.torch_index: one table with scripts/setup.sh (README "Setup"); the reinstall
fix keeps the installed torch version, as scripts/setup.sh pins it (TORCH_SPEC).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

from bundleflow.system.doctor import Facts, GpuInfo
from bundleflow.system.torch_index import (
    MIN_DRIVER,
    MINOR_COMPAT,
    TORCH_INDEX,
    cuda_flavours,
    flavour_cuda,
)
from bundleflow.system.torch_index import choose as choose_torch_build

# --------------------------------------------------------------------------- helpers


def cuda_version_int(version: str | None) -> int | None:
    """``"12.1"`` -> 12010, the encoding of NVML's CUDA driver version."""
    if not version:
        return None
    match = re.match(r"(\d+)\.(\d+)", version)
    return int(match[1]) * 1000 + int(match[2]) * 10 if match else None


def cuda_version_str(version: int | None) -> str:
    return "unknown" if version is None else f"{version // 1000}.{(version % 1000) // 10}"


def cuda_wheel_fix(
    torch_version: str, driver: str | None, capabilities: list[tuple[int, int]] | None = None
) -> str:
    """The pip command that swaps this torch for the CUDA build of the same version that
    scripts/setup.sh would pick for this driver (bundleflow.system.torch_index, README "Setup").
    Without a known driver: the newest build of the line, naming the driver it needs."""
    base = torch_version.split("+")[0]
    flavours = cuda_flavours(base)
    note = ""
    choice = choose_torch_build(base, driver, capabilities) if driver else None
    if choice is not None and choice.flavour != "cpu":
        flavour = choice.flavour
    elif choice is not None:  # a driver older than every build of this line
        flavour = flavours[0]
        need = MINOR_COMPAT[int(flavour_cuda(flavour).split(".")[0])]
        note = f" after upgrading the NVIDIA driver to >= {need}"
    else:
        known = [fl for fl in flavours if flavour_cuda(fl) in MIN_DRIVER] or list(flavours)
        flavour = known[-1]
        need = MIN_DRIVER.get(flavour_cuda(flavour))
        note = f" (needs an NVIDIA driver >= {need})" if need else ""
    return (
        f"reinstall the CUDA build{note}: {pip_command()} install torch=={base}+{flavour} "
        f"--index-url {TORCH_INDEX}{flavour}"
    )


def gpu_capabilities(f: Facts) -> list[tuple[int, int]]:
    """The compute capabilities NVML reports, for choosing the CUDA build that runs on them."""
    return [tuple(g.capability) for g in f.nvml.gpus if g.capability]


def pip_command() -> str:
    """``.venv/bin/python -m pip`` when running from a venv under the working directory (as
    scripts/setup.sh makes it), else ``pip``."""
    try:
        return f"{Path(sys.executable).relative_to(Path.cwd())} -m pip"
    except (ValueError, OSError):
        return "pip"


def gpu_visible(f: Facts) -> bool:
    """Does this machine have an NVIDIA GPU at all (NVML lists one, or /dev/nvidiaN exists)?"""
    nodes = [p for p in f.dev_nvidia if re.fullmatch(r"/dev/nvidia\d+", p)]
    return bool(f.nvml.gpus) or bool(nodes)


def cuda_usable(f: Facts) -> bool:
    return f.torch.available and f.torch.device_count > 0


def visible_devices_problem(value: str | None, nvml_gpus: list[GpuInfo]) -> str | None:
    """Why CUDA_VISIBLE_DEVICES hides GPUs the driver has, or None when it is fine."""
    if value is None:
        return None
    text = value.strip()
    if text in ("", "-1") or text.lower() in ("none", "void", "nodevfiles"):
        return f"CUDA_VISIBLE_DEVICES={value!r} hides every GPU"
    if not nvml_gpus:
        return None  # nothing to compare against
    uuids = {g.uuid for g in nvml_gpus if g.uuid}
    for entry in (e.strip() for e in text.split(",")):
        if entry.startswith(("GPU-", "MIG-")):
            if entry.startswith("GPU-") and uuids and not any(u.startswith(entry) for u in uuids):
                return f"CUDA_VISIBLE_DEVICES entry {entry!r} matches no GPU's UUID"
            continue
        if not entry.isdigit() or int(entry) >= len(nvml_gpus):
            # CUDA stops at the first invalid entry: it and everything after it are ignored.
            return (
                f"CUDA_VISIBLE_DEVICES={value!r}: entry {entry!r} is out of range "
                f"(the driver has GPUs 0..{len(nvml_gpus) - 1}); it and later entries are ignored"
            )
    return None


def requested_visible(value: str | None, nvml_gpus: list[GpuInfo]) -> list[GpuInfo]:
    """The NVML GPUs that CUDA_VISIBLE_DEVICES lets torch see (all when unset)."""
    if value is None:
        return list(nvml_gpus)
    out = []
    for entry in (e.strip() for e in value.split(",")):
        if entry.isdigit() and int(entry) < len(nvml_gpus):
            out.append(nvml_gpus[int(entry)])
        elif entry.startswith("GPU-"):
            out += [g for g in nvml_gpus if g.uuid and g.uuid.startswith(entry)]
        else:
            break
    return out


def has_compute_capability(caps: str | None) -> bool:
    words = {w.strip().lower() for w in (caps or "").split(",")}
    return bool(words & {"compute", "all"})


def arch_supported(capability: tuple[int, int], arch_list: list[str]) -> bool:
    """Is there a cubin the device can run? Binaries run on the same major version and a
    minor version at least theirs (sm_80 code runs on sm_86), never across majors."""
    major, minor = capability
    for arch in arch_list:
        match = re.fullmatch(r"sm_(\d+)[a-z]?", arch)
        if match:
            sm = int(match[1])
            if sm // 10 == major and sm % 10 <= minor:
                return True
    return False


# --------------------------------------------------------------------------- diagnosis


@dataclass(frozen=True)
class Finding:
    """The cause that stops torch from using a GPU, in the words of the environment spec."""

    check: str  # name of the check that reports it
    cause: str
    fix: str


def diagnose(f: Facts) -> Finding | None:
    """The first cause (in the order a user should fix them) why torch cannot use CUDA,
    or None when it can."""
    if cuda_usable(f):
        return None
    for find in (_cpu_wheel, _hidden_gpus, _no_driver, _no_cuda_library, _old_driver):
        finding = find(f)
        if finding is not None:
            return finding
    if f.nvml.ok and not f.nvml.gpus:
        return Finding(
            "gpus",
            "the NVIDIA driver is loaded but sees no GPU",
            "check `nvidia-smi`; in a container, the GPU reservation (--gpus all)",
        )
    t = f.torch
    return Finding(
        "cuda",
        "torch cannot initialise CUDA" + (f": {t.init_error}" if t.init_error else ""),
        "compare `python -m torch.utils.collect_env` with `nvidia-smi`; "
        "reboot after a driver upgrade",
    )


def _cpu_wheel(f: Facts) -> Finding | None:
    """A CPU-only torch (a ROCm one is left to torch's own words)."""
    t = f.torch
    if t.cuda is None and not t.hip:
        return Finding(
            "torch build",
            f"torch {t.version} is a CPU-only wheel (torch.version.cuda is None)",
            cuda_wheel_fix(t.version, f.nvml.driver, gpu_capabilities(f)),
        )
    return None


def _hidden_gpus(f: Facts) -> Finding | None:
    """CUDA_VISIBLE_DEVICES hides the GPUs the driver has."""
    problem = visible_devices_problem(f.env.get("CUDA_VISIBLE_DEVICES"), f.nvml.gpus)
    if problem:
        return Finding(
            "CUDA_VISIBLE_DEVICES",
            problem,
            "unset CUDA_VISIBLE_DEVICES or list valid GPU indices (nvidia-smi -L), e.g. 0",
        )
    return None


def _no_driver(f: Facts) -> Finding | None:
    """Neither NVML nor a /dev/nvidia* node: no driver here, or a container started without
    GPUs."""
    if f.nvml.ok or f.dev_nvidia:
        return None
    if f.container:
        return Finding(
            "/dev/nvidia*",
            "this container was started without GPUs (no /dev/nvidia*, NVML library "
            f"not found: {f.nvml.error})",
            "start it with `docker run --gpus all` or the compose device reservation "
            "(docker compose run --rm SERVICE); check the host with scripts/preflight.sh",
        )
    return Finding(
        "nvml",
        f"no NVIDIA driver or GPU on this machine ({f.nvml.error})",
        "install the NVIDIA driver (>= 530.30.02 for CUDA 12.1) on a GPU machine, "
        "or run on the CPU with --device cpu",
    )


def _no_cuda_library(f: Facts) -> Finding | None:
    """The driver is there but libcuda.so.1 is not: a container without the compute
    capability, or a broken driver install."""
    caps = f.env.get("NVIDIA_DRIVER_CAPABILITIES")
    if f.container and (
        (caps is not None and not has_compute_capability(caps))
        or (caps is None and f.libcuda is not None)
    ):
        return Finding(
            "NVIDIA_DRIVER_CAPABILITIES",
            f"the container lacks the compute capability (NVIDIA_DRIVER_CAPABILITIES={caps!r}"
            + (", libcuda.so.1 not loadable" if f.libcuda else "")
            + ")",
            "base the image on nvidia/cuda or set NVIDIA_DRIVER_CAPABILITIES=compute,utility",
        )
    if f.libcuda is not None:
        where = " in this container" if f.container else ""
        return Finding(
            "libcuda",
            f"NVML works but the CUDA driver library libcuda.so.1 does not load{where} "
            f"({f.libcuda})",
            "base the image on nvidia/cuda or set NVIDIA_DRIVER_CAPABILITIES=compute,utility"
            if f.container
            else "reinstall the NVIDIA driver (its libcuda.so.1 is missing or broken)",
        )
    return None


def _old_driver(f: Facts) -> Finding | None:
    """The driver supports an older CUDA than the wheel's."""
    wheel = cuda_version_int(f.torch.cuda)
    driver = f.nvml.cuda_driver
    if wheel and driver and driver < wheel:
        return Finding(
            "cuda driver",
            f"the driver supports CUDA {cuda_version_str(driver)} (driver {f.nvml.driver}), "
            f"older than the wheel's CUDA {f.torch.cuda}",
            driver_fix(f.torch.cuda),
        )
    return None


def driver_fix(cuda: str | None) -> str:
    """Upgrade the driver to what the wheel's CUDA needs, or take an older CUDA flavour."""
    need = MIN_DRIVER.get(cuda or "")
    need = f">= {need}" if need else f"supporting CUDA {cuda}"
    return (
        f"upgrade the NVIDIA driver ({need}) or use an older CUDA flavour "
        "(CUDA_FLAVOUR in .env; docker/Dockerfile lists each one's driver)"
    )
