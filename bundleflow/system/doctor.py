"""`bundleflow doctor`: why the GPU is (not) used, one finding and one fix per check.

Two layers, so every verdict can be tested without a GPU:

- probes (``probe_*``): small functions that look at torch, NVML (``import pynvml``, the
  nvidia-ml-py package), the environment and the filesystem and return plain facts. They
  never raise: a missing driver, NVML or CUDA is a fact, not a traceback. Tests
  monkeypatch them (or what they read).
- checks (``check_*``): pure functions of the :class:`Facts` returning a :class:`Check`
  (``PASS``/``WARN``/``FAIL``, name, value, fix).

The causes follow the table "What GPU not used looks like" of the environment spec.
:func:`diagnose` names the one cause that stops torch from using CUDA; the trainer's
``--device`` errors quote it (bundleflow.system.devices).
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
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bundleflow.paths import runs_root

# The training hook lives in bundleflow.system.telemetry, so training need not import the doctor;
# its names stay importable from here (bundleflow.perf.profiling uses nvml_handle).
from bundleflow.system.telemetry import gib as _gib
from bundleflow.system.telemetry import gpu_status_line, nvml_handle  # noqa: F401
from bundleflow.system.torch_index import (  # noqa: F401 - TORCH_CUDA_FLAVOURS: re-exported
    MIN_DRIVER,
    MINOR_COMPAT,
    TORCH_CUDA_FLAVOURS,
    TORCH_INDEX,
    cuda_flavours,
    flavour_cuda,
)
from bundleflow.system.torch_index import choose as choose_torch_build

PASS, WARN, FAIL = "PASS", "WARN", "FAIL"

# The PyTorch index, its CUDA builds per torch release line and the driver each CUDA needs
# come from bundleflow.system.torch_index: one table with scripts/setup.sh (README "Setup"). The
# reinstall fix keeps the installed torch version: scripts/setup.sh pins it (TORCH_SPEC).
SHM_MIN_BYTES = 1 << 30  # Docker's default is 64 MB; compose.yaml asks for 8 GB
MIN_PYTHON = (3, 10)  # accelerate >= 1.0
MIN_TORCH = (2, 5)  # the image pin
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


@dataclass(frozen=True)
class Check:
    """One line of the doctor: ``status`` is PASS, WARN or FAIL; ``fix`` is empty on PASS."""

    name: str
    status: str
    value: str
    fix: str = ""

    def line(self) -> str:
        text = f"{self.status:<4}  {self.name:<26} {self.value}"
        return f"{text}\n      fix: {self.fix}" if self.fix else text


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


def _capabilities(f: Facts) -> list[tuple[int, int]]:
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
    t = f.torch
    if t.cuda is None and not t.hip:
        return Finding(
            "torch build",
            f"torch {t.version} is a CPU-only wheel (torch.version.cuda is None)",
            cuda_wheel_fix(t.version, f.nvml.driver, _capabilities(f)),
        )
    visible = f.env.get("CUDA_VISIBLE_DEVICES")
    problem = visible_devices_problem(visible, f.nvml.gpus)
    if problem:
        return Finding(
            "CUDA_VISIBLE_DEVICES",
            problem,
            "unset CUDA_VISIBLE_DEVICES or list valid GPU indices (nvidia-smi -L), e.g. 0",
        )
    if not f.nvml.ok and not f.dev_nvidia:
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
    wheel = cuda_version_int(t.cuda)
    driver = f.nvml.cuda_driver
    if wheel and driver and driver < wheel:
        return Finding(
            "cuda driver",
            f"the driver supports CUDA {cuda_version_str(driver)} (driver {f.nvml.driver}), "
            f"older than the wheel's CUDA {t.cuda}",
            _driver_fix(t.cuda),
        )
    if f.nvml.ok and not f.nvml.gpus:
        return Finding(
            "gpus",
            "the NVIDIA driver is loaded but sees no GPU",
            "check `nvidia-smi`; in a container, the GPU reservation (--gpus all)",
        )
    return Finding(
        "cuda",
        "torch cannot initialise CUDA" + (f": {t.init_error}" if t.init_error else ""),
        "compare `python -m torch.utils.collect_env` with `nvidia-smi`; "
        "reboot after a driver upgrade",
    )


def _driver_fix(cuda: str | None) -> str:
    need = MIN_DRIVER.get(cuda or "")
    need = f">= {need}" if need else f"supporting CUDA {cuda}"
    return (
        f"upgrade the NVIDIA driver ({need}) or use an older CUDA flavour "
        "(CUDA_FLAVOUR in .env; docker/Dockerfile lists each one's driver)"
    )


# --------------------------------------------------------------------------- checks


def _no_gpu_status(expect_gpu: bool) -> str:
    return FAIL if expect_gpu else WARN


NO_GPU_HERE = " (no GPU here: fine for CPU runs)"


def _gpu_plumbing(f: Facts, expect_gpu: bool, name: str, value: str, fix: str) -> Check:
    """A missing piece of the GPU plumbing: FAIL when a GPU is expected or present, PASS
    (informational) on a machine without one, where the ``cuda`` line already says so."""
    if expect_gpu or gpu_visible(f):
        return Check(name, FAIL, value, fix)
    return Check(name, PASS, value + NO_GPU_HERE)


def check_python(f: Facts) -> Check:
    try:
        version = tuple(int(x) for x in f.python.split(".")[:2])
    except ValueError:
        return Check("python", WARN, f.python, "could not read the Python version")
    if version < MIN_PYTHON:
        return Check("python", FAIL, f.python, "use Python >= 3.10 (accelerate >= 1.0 needs it)")
    return Check("python", PASS, f.python)


def check_torch(f: Facts) -> Check:
    match = re.match(r"(\d+)\.(\d+)", f.torch.version)
    if match is None:
        return Check("torch", FAIL, f.torch.version, "install torch (see README: Setup)")
    if (int(match[1]), int(match[2])) < MIN_TORCH:
        return Check("torch", FAIL, f.torch.version, "install torch >= 2.5 (the image pins 2.5.1)")
    return Check("torch", PASS, f.torch.version)


def check_accelerate(f: Facts) -> Check:
    if f.accelerate is None:
        return Check("accelerate", FAIL, "not installed", "pip install 'accelerate>=0.34'")
    return Check("accelerate", PASS, f.accelerate)


def check_torch_build(f: Facts, expect_gpu: bool) -> Check:
    t = f.torch
    if t.hip:
        return Check("torch build", WARN, f"ROCm {t.hip}", "bundleflow is tested on CUDA only")
    if t.cuda is None:
        value = f"CPU-only wheel ({t.version}, torch.version.cuda=None)"
        fix = cuda_wheel_fix(t.version, f.nvml.driver, _capabilities(f))
        if gpu_visible(f) or expect_gpu:
            why = "this machine has a GPU" if gpu_visible(f) else "a GPU is expected"
            return Check("torch build", FAIL, f"{value}; {why}", fix)
        return Check("torch build", WARN, value + " (fine without a GPU)", fix)
    return Check("torch build", PASS, f"CUDA {t.cuda} build ({t.version})")


def check_cudnn(f: Facts) -> Check:
    if f.torch.cuda is None:
        return Check("cudnn", PASS, "n/a (CPU-only wheel)")
    if f.torch.cudnn is None:
        return Check(
            "cudnn",
            WARN,
            "not found",
            "bundleflow does not need cuDNN (MLPs only); reinstall torch if other code does",
        )
    return Check("cudnn", PASS, str(f.torch.cudnn))


def check_nvml(f: Facts, expect_gpu: bool) -> Check:
    n = f.nvml
    if n.ok:
        return Check("nvml", PASS, f"driver {n.driver}, {len(n.gpus)} GPU(s)")
    if n.error and "not installed" in n.error:
        return Check("nvml", WARN, n.error, "pip install nvidia-ml-py")
    finding = diagnose(f)
    fix = (
        finding.fix
        if finding and finding.check in ("nvml", "/dev/nvidia*")
        else "install the NVIDIA driver, or in a container start it with GPUs (--gpus all)"
    )
    if f.torch.available:  # torch works without NVML: only monitoring is lost
        return Check("nvml", WARN, f"unavailable ({n.error})", "install nvidia-ml-py / the driver")
    return _gpu_plumbing(f, expect_gpu, "nvml", f"no driver ({n.error})", fix)


def check_cuda_driver(f: Facts) -> Check:
    wheel = cuda_version_int(f.torch.cuda)
    driver = f.nvml.cuda_driver
    if wheel is None or driver is None:
        reason = "CPU-only wheel" if wheel is None else "no NVML driver version"
        return Check("cuda driver", PASS, f"n/a ({reason})")
    value = (
        f"driver CUDA {cuda_version_str(driver)} ({driver}) vs wheel CUDA {f.torch.cuda} ({wheel})"
    )
    if driver >= wheel:
        return Check("cuda driver", PASS, value)
    if driver // 1000 == wheel // 1000 and f.torch.available:
        return Check(
            "cuda driver",
            WARN,
            value + "; runs under CUDA minor-version compatibility",
            _driver_fix(f.torch.cuda),
        )
    return Check(
        "cuda driver", FAIL, value + ": driver too old for the wheel", _driver_fix(f.torch.cuda)
    )


def check_cuda(f: Facts, expect_gpu: bool) -> Check:
    """The verdict: can torch use a GPU here?"""
    if cuda_usable(f):
        names = ", ".join(d["name"] for d in f.torch.devices)
        return Check("cuda", PASS, f"torch uses {f.torch.device_count} GPU(s): {names}")
    finding = diagnose(f)
    assert finding is not None
    status = FAIL if (gpu_visible(f) or expect_gpu) else WARN
    if status == WARN:
        return Check("cuda", WARN, f"no usable GPU: {finding.cause} (CPU runs only)", finding.fix)
    return Check("cuda", FAIL, f"no usable GPU: {finding.cause}", finding.fix)


def check_gpus(f: Facts) -> list[Check]:
    """One line per GPU the driver sees: name, memory, utilisation, capability."""
    out = []
    visible = {g.index for g in requested_visible(f.env.get("CUDA_VISIBLE_DEVICES"), f.nvml.gpus)}
    for g in f.nvml.gpus:
        cap = f"sm_{g.capability[0]}{g.capability[1]}" if g.capability else "sm_?"
        util = "?" if g.utilization is None else f"{g.utilization}%"
        value = f"{g.name}, {_gib(g.memory_total)} ({_gib(g.memory_used)} used), util {util}, {cap}"
        if g.index not in visible:
            out.append(Check(f"gpu {g.index}", PASS, value + "; hidden by CUDA_VISIBLE_DEVICES"))
        else:
            out.append(Check(f"gpu {g.index}", PASS, value))
    if f.torch.available and f.nvml.ok:
        expected = len(requested_visible(f.env.get("CUDA_VISIBLE_DEVICES"), f.nvml.gpus))
        if f.torch.device_count != expected and not any(
            (f.env.get("CUDA_VISIBLE_DEVICES") or "").strip().startswith(p) for p in ("MIG-",)
        ):
            out.append(
                Check(
                    "gpu count",
                    WARN,
                    f"torch sees {f.torch.device_count}, NVML {expected} (after "
                    "CUDA_VISIBLE_DEVICES)",
                    "check CUDA_VISIBLE_DEVICES against `nvidia-smi -L`",
                )
            )
    return out


def check_arch(f: Facts) -> Check:
    """The device's compute capability against the architectures compiled into the wheel."""
    if f.torch.cuda is None:
        return Check("arch", PASS, "n/a (CPU-only wheel)")
    caps = [(d["name"], d["capability"]) for d in f.torch.devices] or [
        (g.name, g.capability) for g in f.nvml.gpus if g.capability
    ]
    if not caps:
        return Check("arch", PASS, "n/a (no GPU visible)")
    arches = f.torch.arch_list
    shown = f"{arches[0]}..{arches[-1]}" if len(arches) > 1 else ",".join(arches) or "none"
    missing = [(n, c) for n, c in caps if not arch_supported(tuple(c), arches)]
    if not arches:
        return Check("arch", WARN, f"the wheel reports no arch list (device {caps[0]})")
    if missing:
        name, (major, minor) = missing[0]
        return Check(
            "arch",
            FAIL,
            f"{name} is sm_{major}{minor}, not in the wheel's {shown} (torch {f.torch.version})",
            "a newer CUDA flavour (Blackwell needs >= cu128): CUDA_FLAVOUR=cu128 in .env, then "
            "docker compose build",
        )
    name, (major, minor) = caps[0]
    return Check("arch", PASS, f"sm_{major}{minor} ({name}) in the wheel's {shown}")


def check_bf16(f: Facts) -> Check:
    requested = (f.env.get("ACCELERATE_MIXED_PRECISION") or "").lower() == "bf16"
    if not cuda_usable(f):
        return Check("bf16", PASS, "n/a on CUDA (no usable GPU); CPU autocast supports bf16")
    if f.torch.bf16:
        return Check("bf16", PASS, f"supported on {f.torch.devices[0]['name']}")
    fix = "use --mixed-precision fp16 or no mixed precision"
    if requested:
        return Check("bf16", FAIL, "requested (ACCELERATE_MIXED_PRECISION=bf16), unsupported", fix)
    return Check("bf16", WARN, f"not supported on {f.torch.devices[0]['name']}", fix)


COMPILE_FALLBACK = (
    "Triton cannot build its CUDA launcher, so torch.compile fails and the Stage-2 kernels "
    "and Adam run eagerly (about 2x slower steps)"
)


def _compile_status(f: Facts, expect_gpu: bool) -> str:
    """FAIL where GPU kernels will be compiled (a usable or expected GPU), WARN otherwise."""
    return FAIL if (cuda_usable(f) or expect_gpu) else WARN


def check_compiler(f: Facts, expect_gpu: bool) -> Check:
    """The C compiler Triton runs at run time ($CC, else gcc, else clang) and libc headers."""
    c = f.compiler
    if c is None:
        return Check("c compiler", PASS, "n/a (CPU-only torch: no Triton kernels to compile)")
    install = "sudo apt-get install gcc libc6-dev (Debian/Ubuntu; the image has them)"
    if c.cc is None:
        if c.cc_env is not None:
            value = f"CC={c.cc_env} is not an executable: {COMPILE_FALLBACK}"
            fix = f"unset CC or point it at a C compiler (CC=gcc); to install one: {install}"
        else:
            value = f"none (no gcc or clang on PATH): {COMPILE_FALLBACK}"
            fix = f"install a C compiler: {install}"
        return Check("c compiler", _compile_status(f, expect_gpu), value, fix)
    if c.cc_error:
        return Check(
            "c compiler",
            _compile_status(f, expect_gpu),
            f"{c.cc} cannot compile with the C library headers ({c.cc_error}): {COMPILE_FALLBACK}",
            "install the C library headers: sudo apt-get install libc6-dev",
        )
    return Check("c compiler", PASS, f"{c.cc} (Triton builds its CUDA launcher with it)")


def check_python_headers(f: Facts, expect_gpu: bool) -> Check:
    """Python.h where Triton looks for it (sysconfig's include directory)."""
    c = f.compiler
    if c is None:
        return Check("python headers", PASS, "n/a (CPU-only torch: no Triton kernels to compile)")
    where = os.path.join(c.python_include, "Python.h")
    if c.python_h:
        return Check("python headers", PASS, where)
    major_minor = ".".join(f.python.split(".")[:2])
    return Check(
        "python headers",
        _compile_status(f, expect_gpu),
        f"{where} missing: {COMPILE_FALLBACK}",
        f"install the headers of Python {major_minor}: sudo apt-get install "
        f"python{major_minor}-dev (Debian/Ubuntu system Python; python3-dev in the image); "
        "pyenv, conda and uv Pythons ship them: reinstall that Python",
    )


def check_visible_devices(f: Facts) -> Check:
    value = f.env.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return Check("CUDA_VISIBLE_DEVICES", PASS, "unset (all GPUs)")
    problem = visible_devices_problem(value, f.nvml.gpus)
    if problem is None:
        return Check("CUDA_VISIBLE_DEVICES", PASS, repr(value))
    fix = "unset CUDA_VISIBLE_DEVICES or list valid GPU indices (nvidia-smi -L), e.g. 0"
    status = FAIL if (gpu_visible(f) and not cuda_usable(f)) else WARN
    return Check("CUDA_VISIBLE_DEVICES", status, problem, fix)


def check_nvidia_visible(f: Facts, expect_gpu: bool) -> Check:
    value = f.env.get("NVIDIA_VISIBLE_DEVICES")
    if not f.container:
        shown = "unset" if value is None else repr(value)
        return Check(
            "NVIDIA_VISIBLE_DEVICES", PASS, f"{shown} (read only by the NVIDIA container runtime)"
        )
    if value is None or value.strip().lower() in ("", "void", "none"):
        shown = ("unset" if value is None else repr(value)) + ": the runtime passes no GPU"
        if cuda_usable(f):
            return Check("NVIDIA_VISIBLE_DEVICES", PASS, shown + ", yet CUDA works")
        return _gpu_plumbing(
            f,
            expect_gpu,
            "NVIDIA_VISIBLE_DEVICES",
            shown,
            "start the container with --gpus all or the compose device reservation",
        )
    return Check("NVIDIA_VISIBLE_DEVICES", PASS, repr(value))


def check_driver_capabilities(f: Facts, expect_gpu: bool) -> Check:
    caps = f.env.get("NVIDIA_DRIVER_CAPABILITIES")
    name = "NVIDIA_DRIVER_CAPABILITIES"
    if not f.container:
        shown = "unset" if caps is None else repr(caps)
        return Check(name, PASS, f"{shown} (read only by the NVIDIA container runtime)")
    fix = "base the image on nvidia/cuda or set NVIDIA_DRIVER_CAPABILITIES=compute,utility"
    if cuda_usable(f):
        return Check(name, PASS, "unset (CUDA works)" if caps is None else repr(caps))
    if caps is None:
        # Unset, the NVIDIA runtime mounts "utility" only: nvidia-smi works, CUDA does not.
        return _gpu_plumbing(
            f, expect_gpu, name, "unset (the runtime then gives utility only)", fix
        )
    if not has_compute_capability(caps):
        return _gpu_plumbing(f, expect_gpu, name, f"{caps!r} lacks compute", fix)
    return Check(name, PASS, repr(caps))


def check_libcuda(f: Facts, expect_gpu: bool) -> Check:
    if f.libcuda is None:
        return Check("libcuda", PASS, "libcuda.so.1 loads" if sys.platform == "linux" else "n/a")
    if not gpu_visible(f):
        return _gpu_plumbing(
            f,
            expect_gpu,
            "libcuda",
            "libcuda.so.1 not found (no NVIDIA driver)",
            "install the NVIDIA driver, or in a container start it with GPUs (--gpus all)",
        )
    finding = diagnose(f)
    fix = finding.fix if finding else "reinstall the NVIDIA driver"
    return Check("libcuda", FAIL, f"libcuda.so.1 does not load: {f.libcuda}", fix)


def check_container(f: Facts) -> Check:
    if not f.container:
        return Check("container", PASS, "not in a container")
    return Check("container", PASS, "yes: " + "; ".join(f.container))


def check_dev_nvidia(f: Facts, expect_gpu: bool) -> Check:
    if f.dev_nvidia:
        shown = " ".join(f.dev_nvidia[:6]) + (" ..." if len(f.dev_nvidia) > 6 else "")
        return Check("/dev/nvidia*", PASS, shown)
    if f.container:
        fix = "start the container with --gpus all or the compose device reservation"
    else:
        fix = "install the NVIDIA driver on a GPU machine (or run on the CPU)"
    if f.torch.available:  # e.g. WSL or macOS: CUDA works without device nodes
        return Check("/dev/nvidia*", PASS, "none (CUDA works without them here)")
    return _gpu_plumbing(f, expect_gpu, "/dev/nvidia*", "none", fix)


def check_shm(f: Facts) -> Check:
    if f.shm_bytes is None:
        return Check("/dev/shm", PASS, "n/a (no /dev/shm)")
    value = _gib(f.shm_bytes) if f.shm_bytes >= 1 << 28 else f"{f.shm_bytes / 2**20:.0f} MiB"
    if f.shm_bytes < SHM_MIN_BYTES:
        return Check(
            "/dev/shm",
            WARN,
            f"{value} (< 1 GiB: DataLoader workers and multi-process runs fail)",
            "compose `shm_size` (BUNDLEFLOW_SHM_SIZE, default 8gb) or `ipc: host`; "
            "docker run --shm-size=8g",
        )
    return Check("/dev/shm", PASS, value)


def check_cuda_home(f: Facts) -> Check:
    home, path = f.env.get("CUDA_HOME"), f.env.get("CUDA_PATH")
    note = (
        "not read by torch.cuda.is_available(): the wheel brings its own CUDA runtime; "
        "only compiling CUDA extensions needs them"
    )
    if home is None and path is None:
        return Check("CUDA_HOME/CUDA_PATH", PASS, f"unset ({note})")
    shown = ", ".join(f"{k}={v}" for k, v in (("CUDA_HOME", home), ("CUDA_PATH", path)) if v)
    missing = [v for v in (home, path) if v and not os.path.isdir(v)]
    if missing:
        return Check(
            "CUDA_HOME/CUDA_PATH",
            WARN,
            f"{shown}: {missing[0]} does not exist ({note})",
            "unset it unless you compile CUDA extensions; it does not make the GPU usable",
        )
    return Check("CUDA_HOME/CUDA_PATH", PASS, f"{shown} ({note})")


def check_launcher(f: Facts) -> Check:
    la = f.launcher
    if la.world_size is None:
        if la.error:
            return Check("launcher", WARN, la.error, "unset WORLD_SIZE or set it to a number")
        return Check("launcher", PASS, "not under a launcher (WORLD_SIZE unset)")
    if la.num_processes is None:
        return Check(
            "launcher",
            FAIL,
            f"WORLD_SIZE={la.world_size}, accelerate could not start: {la.error}",
            "fix the checks above first, then relaunch with accelerate launch / torchrun",
        )
    value = f"WORLD_SIZE={la.world_size}, accelerate sees {la.num_processes} process(es)"
    if la.num_processes != la.world_size:
        return Check(
            "launcher",
            FAIL,
            value + ": the launch fell back to independent single-process runs",
            "fix the GPU checks above first (a CPU wheel or hidden GPUs make --multi_gpu start "
            "N separate runs); on CPU use ACCELERATE_USE_CPU=1 torchrun --nproc_per_node N",
        )
    return Check("launcher", PASS, value)


def check_runs_dir(f: Facts) -> Check:
    path, writable, detail = f.runs_dir
    if writable:
        return Check("runs dir", PASS, f"{path} writable ({detail})")
    return Check(
        "runs dir",
        FAIL,
        f"{path} not writable ({detail})",
        "set BUNDLEFLOW_HOME in the shell or .env (runs go to $BUNDLEFLOW_HOME/runs), or "
        "pass --runs-dir to a writable directory",
    )


def check_dotenv(f: Facts) -> Check:
    if f.dotenv is None:  # optional: the defaults work without one (.env.example)
        return Check(".env", PASS, "none (optional; the built-in defaults apply)")
    path, keys = f.dotenv
    return Check(".env", PASS, f"{path}: keys {', '.join(keys) or '(none)'} (values not shown)")


def run_checks(f: Facts, expect_gpu: bool = False) -> list[Check]:
    """Every check, in the order of the report. A check that raises becomes a WARN line."""
    steps: list[Callable[[], Check | list[Check]]] = [
        lambda: check_python(f),
        lambda: check_torch(f),
        lambda: check_accelerate(f),
        lambda: check_torch_build(f, expect_gpu),
        lambda: check_cudnn(f),
        lambda: check_nvml(f, expect_gpu),
        lambda: check_cuda_driver(f),
        lambda: check_gpus(f),
        lambda: check_cuda(f, expect_gpu),
        lambda: check_arch(f),
        lambda: check_bf16(f),
        lambda: check_compiler(f, expect_gpu),
        lambda: check_python_headers(f, expect_gpu),
        lambda: check_visible_devices(f),
        lambda: check_nvidia_visible(f, expect_gpu),
        lambda: check_driver_capabilities(f, expect_gpu),
        lambda: check_libcuda(f, expect_gpu),
        lambda: check_container(f),
        lambda: check_dev_nvidia(f, expect_gpu),
        lambda: check_shm(f),
        lambda: check_cuda_home(f),
        lambda: check_launcher(f),
        lambda: check_runs_dir(f),
        lambda: check_dotenv(f),
    ]
    out: list[Check] = []
    for step in steps:
        try:
            result = step()
        except Exception as err:  # noqa: BLE001 - one broken check must not hide the others
            result = Check("internal", WARN, f"a check raised {type(err).__name__}: {err}", "")
        out.extend(result if isinstance(result, list) else [result])
    return out


def exit_code(checks: list[Check]) -> int:
    return 1 if any(c.status == FAIL for c in checks) else 0


def to_json(checks: list[Check], f: Facts, expect_gpu: bool) -> dict:
    return {
        "ok": exit_code(checks) == 0,
        "expect_gpu": expect_gpu,
        "checks": [asdict(c) for c in checks],
        "summary": {s: sum(c.status == s for c in checks) for s in (PASS, WARN, FAIL)},
        "facts": asdict(f),
    }


def format_report(checks: list[Check]) -> str:
    counts = {s: sum(c.status == s for c in checks) for s in (PASS, WARN, FAIL)}
    tail = f"{counts[PASS]} pass, {counts[WARN]} warn, {counts[FAIL]} fail"
    return "\n".join([*(c.line() for c in checks), tail])
