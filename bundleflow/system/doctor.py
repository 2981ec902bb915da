"""`bundleflow doctor`: why the GPU is (not) used, one finding and one fix per check.

Three modules, so every verdict can be tested without a GPU:

- this one, the probes (``probe_*``): small functions that look at torch, NVML (``import
  pynvml``, the nvidia-ml-py package), the environment and the filesystem and return plain
  facts (:class:`Facts`, gathered by :func:`gather`). They never raise: a missing driver, NVML
  or CUDA is a fact, not a traceback. Tests monkeypatch them (or what they read).
- :mod:`bundleflow.system.diagnosis`: what the facts mean (is CUDA usable, which GPUs does
  CUDA_VISIBLE_DEVICES leave) and :func:`~bundleflow.system.diagnosis.diagnose`, the one cause
  that stops torch from using CUDA, with its fix; the trainer's ``--device`` errors quote it
  (bundleflow.system.devices).
- :mod:`bundleflow.system.doctor_checks`: pure functions of the :class:`Facts` returning a
  ``Check`` (``PASS``/``WARN``/``FAIL``, name, value, fix), and the report made of them.

The causes follow the table "What GPU not used looks like" of the environment spec.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bundleflow.paths import runs_root

ENV_KEYS = (
    "CUDA_VISIBLE_DEVICES",
    "NVIDIA_VISIBLE_DEVICES",
    "NVIDIA_DRIVER_CAPABILITIES",
    "CUDA_HOME",
    "CUDA_PATH",
    "CC",  # the C compiler Triton builds its CUDA launcher with (else gcc, else clang)
    "WORLD_SIZE",
    "ACCELERATE_MIXED_PRECISION",
    "BUNDLEFLOW_HOME",
)


# --------------------------------------------------------------------------- facts


@dataclass
class GpuInfo:
    """One GPU as NVML sees it (fields None where NVML does not say)."""

    index: int
    name: str
    uuid: str | None = None
    memory_total: int | None = None  # bytes
    memory_used: int | None = None
    utilization: int | None = None  # percent
    capability: tuple[int, int] | None = None


@dataclass
class NvmlFacts:
    ok: bool
    error: str | None = None  # e.g. "NVMLError_LibraryNotFound" or "pynvml not installed"
    driver: str | None = None  # "550.54.14"
    cuda_driver: int | None = None  # 12040 = CUDA 12.4
    gpus: list[GpuInfo] = field(default_factory=list)


@dataclass
class TorchFacts:
    version: str
    cuda: str | None  # torch.version.cuda: None on a CPU-only wheel
    compiled: bool  # torch.cuda._is_compiled()
    available: bool  # torch.cuda.is_available()
    init_error: str | None = None  # why CUDA did not initialise (torch's own words)
    device_count: int = 0
    devices: list[dict] = field(default_factory=list)  # name, capability, memory_total
    arch_list: list[str] = field(default_factory=list)
    cudnn: int | None = None
    bf16: bool | None = None  # torch.cuda.is_bf16_supported() when CUDA works
    hip: str | None = None


@dataclass
class LauncherFacts:
    world_size: int | None  # WORLD_SIZE, None when not under a launcher
    num_processes: int | None = None  # what accelerate's PartialState sees
    process_index: int = 0
    error: str | None = None


@dataclass
class CompilerFacts:
    """What Triton compiles its CUDA launcher (driver.c, one launcher per kernel signature)
    with at run time, found the way triton.runtime.build finds it."""

    cc: str | None  # $CC resolved on PATH, else gcc, else clang; None: none usable
    cc_env: str | None  # $CC as set
    cc_error: str | None  # why a C file with the libc headers Triton's include failed
    python_include: str  # the directory Triton passes for Python.h
    python_h: bool  # does it hold Python.h?


@dataclass
class Facts:
    python: str
    torch: TorchFacts
    accelerate: str | None  # version, None when not installed
    nvml: NvmlFacts
    env: dict[str, str | None]
    container: list[str]  # markers found, empty outside a container
    dev_nvidia: list[str]
    libcuda: str | None  # None when libcuda.so.1 loads, else why not
    shm_bytes: int | None
    runs_dir: tuple[str, bool, str]  # path, writable, detail
    dotenv: tuple[str, list[str]] | None  # path and keys (never values)
    launcher: LauncherFacts
    compiler: CompilerFacts | None = None  # None: not probed (a CPU-only torch)


# --------------------------------------------------------------------------- probes


def _guard(probe: Callable, default):
    """Run a probe; a probe that raises is reported as its default, never as a crash."""
    try:
        return probe()
    except Exception:  # noqa: BLE001 - the doctor must not crash on a broken environment
        return default


def probe_python() -> str:
    return platform.python_version()


def probe_accelerate() -> str | None:
    try:
        import accelerate
    except Exception:  # noqa: BLE001 - ImportError or a broken install
        return None
    return str(getattr(accelerate, "__version__", "unknown"))


def probe_torch() -> TorchFacts:
    import torch

    compiled = bool(torch.cuda._is_compiled())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = bool(torch.cuda.is_available())
    facts = TorchFacts(
        version=str(torch.__version__),
        cuda=torch.version.cuda,
        compiled=compiled,
        available=available,
        hip=getattr(torch.version, "hip", None),
    )
    with contextlib.suppress(Exception):
        facts.arch_list = list(torch.cuda.get_arch_list())
    with contextlib.suppress(Exception):
        facts.cudnn = (
            torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        )
    if available:
        facts.device_count = int(torch.cuda.device_count())
        for i in range(facts.device_count):
            props = torch.cuda.get_device_properties(i)
            facts.devices.append(
                {
                    "name": props.name,
                    "capability": (props.major, props.minor),
                    "memory_total": int(props.total_memory),
                    "uuid": str(getattr(props, "uuid", "") or "") or None,
                }
            )
        with contextlib.suppress(Exception):
            facts.bf16 = bool(torch.cuda.is_bf16_supported())
    elif compiled:
        # torch's own reason ("driver too old", "no NVIDIA driver", ...), from the
        # is_available() warning or from initialising CUDA explicitly.
        messages = [str(w.message) for w in caught]
        try:
            torch.cuda.init()
        except Exception as err:  # noqa: BLE001
            messages.append(str(err))
        facts.init_error = " | ".join(dict.fromkeys(m.strip() for m in messages if m)) or None
    return facts


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def probe_nvml() -> NvmlFacts:
    """Driver and GPUs through NVML; nvmlShutdown always follows a successful nvmlInit."""
    try:
        import pynvml
    except Exception:  # noqa: BLE001
        return NvmlFacts(ok=False, error="pynvml not installed (pip install nvidia-ml-py)")
    try:
        pynvml.nvmlInit()
    except Exception as err:  # noqa: BLE001 - NVMLError_LibraryNotFound, DriverNotLoaded, ...
        return NvmlFacts(ok=False, error=type(err).__name__ + (f": {err}" if str(err) else ""))
    try:
        facts = NvmlFacts(ok=True)
        with contextlib.suppress(Exception):
            facts.driver = _text(pynvml.nvmlSystemGetDriverVersion())
        with contextlib.suppress(Exception):
            facts.cuda_driver = int(pynvml.nvmlSystemGetCudaDriverVersion())
        for i in range(int(pynvml.nvmlDeviceGetCount())):
            facts.gpus.append(_nvml_gpu(pynvml, i))
        return facts
    except Exception as err:  # noqa: BLE001
        return NvmlFacts(ok=False, error=type(err).__name__ + (f": {err}" if str(err) else ""))
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()


def _nvml_gpu(pynvml, index: int) -> GpuInfo:
    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    gpu = GpuInfo(index=index, name=_text(pynvml.nvmlDeviceGetName(handle)))
    with contextlib.suppress(Exception):
        gpu.uuid = _text(pynvml.nvmlDeviceGetUUID(handle))
    with contextlib.suppress(Exception):
        mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
        gpu.memory_total, gpu.memory_used = int(mem.total), int(mem.used)
    with contextlib.suppress(Exception):
        gpu.utilization = int(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
    with contextlib.suppress(Exception):
        major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
        gpu.capability = (int(major), int(minor))
    return gpu


def probe_env() -> dict[str, str | None]:
    return {key: os.environ.get(key) for key in ENV_KEYS}


def probe_container() -> list[str]:
    """Markers of a container: Docker's /.dockerenv, Podman's /run/.containerenv, cgroups."""
    found = [p for p in ("/.dockerenv", "/run/.containerenv") if os.path.exists(p)]
    with contextlib.suppress(OSError):
        cgroup = Path("/proc/1/cgroup").read_text()
        for word in ("docker", "kubepods", "containerd", "libpod", "lxc"):
            if word in cgroup:
                found.append(f"/proc/1/cgroup mentions {word}")
                break
    return found


def probe_dev_nvidia() -> list[str]:
    return sorted(glob.glob("/dev/nvidia*"))


def probe_libcuda() -> str | None:
    """None when the driver's libcuda.so.1 loads (what CUDA needs), else why not."""
    if sys.platform != "linux":
        return None  # only Linux ships libcuda.so.1; elsewhere NVML and torch speak
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError as err:
        return str(err)
    return None


def probe_shm() -> int | None:
    if not os.path.isdir("/dev/shm"):
        return None
    st = os.statvfs("/dev/shm")
    return st.f_frsize * st.f_blocks


def probe_runs_dir() -> tuple[str, bool, str]:
    """The runs root (``$BUNDLEFLOW_HOME/runs`` or ./runs) and whether a run can be made."""
    root = runs_root().resolve()
    probe = root
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    writable = os.access(probe, os.W_OK | os.X_OK) and probe.is_dir()
    detail = "exists" if probe == root else f"will be created under {probe}"
    return str(root), writable, detail


def find_dotenv_file(start: Path | None = None) -> Path | None:
    """The `.env` the CLI loads: the first one in the working directory or above it."""
    here = (start or Path.cwd()).resolve()
    for directory in (here, *here.parents):
        candidate = directory / ".env"
        if candidate.is_file():
            return candidate
    return None


def dotenv_keys(path: Path) -> list[str]:
    """The variable names a .env file sets; its values are never read into the result."""
    keys = []
    for raw in path.read_text(errors="replace").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        line = line.removeprefix("export ").strip()
        name = line.split("=", 1)[0].strip()
        if "=" in line and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", name):
            keys.append(name)
    return keys


def probe_dotenv() -> tuple[str, list[str]] | None:
    path = find_dotenv_file()
    return None if path is None else (str(path), dotenv_keys(path))


def probe_launcher(world_size: str | None) -> LauncherFacts:
    """Under a launcher (WORLD_SIZE set): how many processes accelerate sees."""
    if not world_size:
        return LauncherFacts(world_size=None)
    try:
        size = int(world_size)
    except ValueError:
        return LauncherFacts(world_size=None, error=f"WORLD_SIZE={world_size!r} is not a number")
    try:
        import torch
        from accelerate import PartialState

        # As the trainer's Accelerator(cpu=...): without CUDA the run is a CPU one, and only
        # cpu=True makes accelerate join the launcher's processes over gloo.
        state = PartialState(cpu=not torch.cuda.is_available())
        return LauncherFacts(
            world_size=size,
            num_processes=int(state.num_processes),
            process_index=int(state.process_index),
        )
    except Exception as err:  # noqa: BLE001
        return LauncherFacts(world_size=size, error=f"{type(err).__name__}: {err}")


# Headers Triton's driver.c and launchers include besides cuda.h and Python.h (libc6-dev).
LIBC_PROBE = (
    "#include <dlfcn.h>\n#include <stdbool.h>\n#include <stdatomic.h>\n#include <stdlib.h>\n"
)


def probe_compiler(env: dict[str, str | None]) -> CompilerFacts:
    """The C compiler and Python headers Triton would use; a preprocessor run checks the
    libc headers (no file is written)."""
    cc_env = env.get("CC")
    if cc_env is not None:
        cc = shutil.which(cc_env)
    else:
        cc = shutil.which("gcc") or shutil.which("clang")
    scheme = sysconfig.get_default_scheme()
    include = sysconfig.get_paths(scheme="posix_prefix" if scheme == "posix_local" else scheme)[
        "include"
    ]
    error = None
    if cc is not None:
        try:
            run = subprocess.run(
                [cc, "-E", "-x", "c", "-", "-o", os.devnull],
                input=LIBC_PROBE,
                capture_output=True,
                text=True,
                timeout=30,
            )
            if run.returncode != 0:
                lines = [line for line in run.stderr.splitlines() if line.strip()]
                error = lines[0] if lines else f"exit {run.returncode}"
        except (OSError, subprocess.SubprocessError) as err:
            error = f"{type(err).__name__}: {err}"
    return CompilerFacts(
        cc=cc,
        cc_env=cc_env,
        cc_error=error,
        python_include=include,
        python_h=os.path.isfile(os.path.join(include, "Python.h")),
    )


def gather(*, launcher: bool = True) -> Facts:
    """Every probe, each guarded: what this machine looks like to bundleflow.

    ``launcher=False`` skips starting accelerate's process state (the trainer does that
    itself, after choosing the device)."""
    env = _guard(probe_env, {k: None for k in ENV_KEYS})
    unknown_torch = TorchFacts(version="not importable", cuda=None, compiled=False, available=False)
    torch_facts = _guard(probe_torch, unknown_torch)
    return Facts(
        python=_guard(probe_python, "unknown"),
        torch=torch_facts,
        accelerate=_guard(probe_accelerate, None),
        nvml=_guard(probe_nvml, NvmlFacts(ok=False, error="NVML probe failed")),
        env=env,
        container=_guard(probe_container, []),
        dev_nvidia=_guard(probe_dev_nvidia, []),
        libcuda=_guard(probe_libcuda, "could not probe libcuda.so.1"),
        shm_bytes=_guard(probe_shm, None),
        runs_dir=_guard(probe_runs_dir, ("runs", False, "could not resolve the runs directory")),
        dotenv=_guard(probe_dotenv, None),
        launcher=_guard(
            lambda: probe_launcher(env.get("WORLD_SIZE") if launcher else None),
            LauncherFacts(world_size=None),
        ),
        # Only a CUDA torch compiles GPU kernels with Triton: a CPU machine runs no compiler.
        compiler=_guard(lambda: probe_compiler(env), None) if torch_facts.cuda else None,
    )
