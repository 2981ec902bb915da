"""The doctor's checks: one :class:`Check` per line of `bundleflow doctor`, pure functions of
the facts (bundleflow.system.doctor), and the report, its JSON and its exit code made of them.

A missing piece of GPU plumbing fails where a GPU is present or expected (``--expect-gpu``)
and is informational on a machine without one; where torch cannot use CUDA, the fix is the
diagnosis's (bundleflow.system.diagnosis).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass

from bundleflow.system.diagnosis import (
    arch_supported,
    cuda_usable,
    cuda_version_int,
    cuda_version_str,
    cuda_wheel_fix,
    diagnose,
    driver_fix,
    gpu_capabilities,
    gpu_visible,
    has_compute_capability,
    requested_visible,
    visible_devices_problem,
)
from bundleflow.system.doctor import Facts
from bundleflow.system.telemetry import gib as _gib

PASS, WARN, FAIL = "PASS", "WARN", "FAIL"
SHM_MIN_BYTES = 1 << 30  # Docker's default is 64 MB; compose.yaml asks for 8 GB
MIN_PYTHON = (3, 10)  # accelerate >= 1.0
MIN_TORCH = (2, 5)  # the image pin


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


# --------------------------------------------------------------------------- checks


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
        fix = cuda_wheel_fix(t.version, f.nvml.driver, gpu_capabilities(f))
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
            driver_fix(f.torch.cuda),
        )
    return Check(
        "cuda driver", FAIL, value + ": driver too old for the wheel", driver_fix(f.torch.cuda)
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
