"""`bundleflow doctor`: one test per cause of the environment spec's "GPU not used" table,
with torch, NVML, the environment and the filesystem probes replaced; JSON shape; exit
codes; the trainer's --device errors quoting the doctor; telemetry.gpu_status_line."""

from __future__ import annotations

import json
import sys
import types
import warnings
from dataclasses import replace

import pytest
import torch

from bundleflow.cli.app import main
from bundleflow.errors import BundleflowError
from bundleflow.system import devices, diagnosis, doctor, doctor_checks, telemetry
from bundleflow.system.doctor import (
    CompilerFacts,
    Facts,
    GpuInfo,
    LauncherFacts,
    NvmlFacts,
    TorchFacts,
)
from bundleflow.system.doctor_checks import FAIL, PASS, WARN
from bundleflow.system.torch_index import TORCH_INDEX
from tests.conftest import run_cli

H100 = (9, 0)
# The image's compiler and headers (Triton builds its CUDA launcher with them)
GCC = CompilerFacts(
    cc="/usr/bin/gcc",
    cc_env=None,
    cc_error=None,
    python_include="/usr/include/python3.10",
    python_h=True,
)
CU121_ARCHES = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]


def h100_facts(**changes) -> Facts:
    """A healthy machine: torch 2.5.1+cu121 on one H100, driver 550 (CUDA 12.4), in the image."""
    base = Facts(
        python="3.10.12",
        torch=TorchFacts(
            version="2.5.1+cu121",
            cuda="12.1",
            compiled=True,
            available=True,
            device_count=1,
            devices=[
                {"name": "NVIDIA H100 80GB HBM3", "capability": H100, "memory_total": 80 << 30}
            ],
            arch_list=list(CU121_ARCHES),
            cudnn=90100,
            bf16=True,
        ),
        accelerate="1.1.1",
        nvml=NvmlFacts(
            ok=True,
            driver="550.54.15",
            cuda_driver=12040,
            gpus=[
                GpuInfo(
                    0,
                    "NVIDIA H100 80GB HBM3",
                    uuid="GPU-abc",
                    memory_total=80 << 30,
                    memory_used=1 << 30,
                    utilization=0,
                    capability=H100,
                )
            ],
        ),
        env={k: None for k in doctor.ENV_KEYS}
        | {"NVIDIA_VISIBLE_DEVICES": "all", "NVIDIA_DRIVER_CAPABILITIES": "compute,utility"},
        container=["/.dockerenv"],
        dev_nvidia=["/dev/nvidia0", "/dev/nvidiactl", "/dev/nvidia-uvm"],
        libcuda=None,
        shm_bytes=8 << 30,
        runs_dir=("/bundleflow/runs", True, "exists"),
        dotenv=("/app/.env", ["BUNDLEFLOW_UID"]),
        launcher=LauncherFacts(world_size=None),
        compiler=GCC,
    )
    return replace(base, **changes)


def unusable(facts: Facts, **torch_changes) -> Facts:
    """The same machine where torch cannot initialise CUDA."""
    t = replace(
        facts.torch, available=False, device_count=0, devices=[], bf16=None, **torch_changes
    )
    return replace(facts, torch=t)


def env(facts: Facts, **values) -> Facts:
    return replace(facts, env={**facts.env, **values})


def by_name(checks) -> dict[str, doctor_checks.Check]:
    return {c.name: c for c in checks}


def verdict(facts: Facts, name: str, expect_gpu: bool = False) -> doctor_checks.Check:
    return by_name(doctor_checks.run_checks(facts, expect_gpu=expect_gpu))[name]


# --------------------------------------------------------------------------- the healthy case


def test_healthy_h100_passes_every_check():
    checks = doctor_checks.run_checks(h100_facts(), expect_gpu=True)
    assert [c for c in checks if c.status != PASS] == []
    assert doctor_checks.exit_code(checks) == 0
    named = by_name(checks)
    assert "NVIDIA H100 80GB HBM3" in named["gpu 0"].value and "sm_90" in named["gpu 0"].value
    assert "80.0 GiB" in named["gpu 0"].value and "util 0%" in named["gpu 0"].value
    assert named["arch"].value.startswith("sm_90")
    assert diagnosis.diagnose(h100_facts()) is None


# --------------------------------------------------------------------------- the table's causes


def test_cpu_only_wheel_on_a_gpu_machine_fails_with_the_reinstall_for_its_driver():
    """Driver 550.54.15: the newest CUDA build of 2.5.1 it runs is cu124 (setup.sh's table)."""
    facts = unusable(h100_facts(), cuda=None, version="2.5.1+cpu", compiled=False, arch_list=[])
    checks = by_name(doctor_checks.run_checks(facts))  # a FAIL even without --expect-gpu
    assert checks["torch build"].status == FAIL and "CPU-only" in checks["torch build"].value
    assert checks["cuda"].status == FAIL
    for name in ("torch build", "cuda"):
        assert "+cu124" in checks[name].fix and "download.pytorch.org/whl/cu124" in checks[name].fix
    assert diagnosis.diagnose(facts).check == "torch build"


def test_cpu_only_wheel_without_a_gpu_warns_unless_a_gpu_is_expected():
    facts = unusable(
        h100_facts(
            nvml=NvmlFacts(ok=False, error="NVMLError_LibraryNotFound"),
            dev_nvidia=[],
            container=[],
            libcuda="libcuda.so.1: cannot open shared object file",
        ),
        cuda=None,
        version="2.13.0+cpu",
        compiled=False,
    )
    relaxed = doctor_checks.run_checks(facts)
    assert {c.name for c in relaxed if c.status == WARN} >= {"torch build", "cuda"}
    assert doctor_checks.exit_code(relaxed) == 0
    strict = by_name(doctor_checks.run_checks(facts, expect_gpu=True))
    assert strict["cuda"].status == FAIL
    # the CUDA build of the installed version (setup.sh's pin), never the image's 2.5.1;
    # no driver known: the newest build of 2.13 (there is no cu128 for 2.13), naming its driver
    assert "(needs an NVIDIA driver >= 580.65.06)" in strict["cuda"].fix
    assert "torch==2.13.0+cu130 --index-url https://download.pytorch.org/whl/cu130" in (
        strict["cuda"].fix
    )
    assert doctor_checks.exit_code(list(strict.values())) == 1


@pytest.mark.parametrize(
    ("version", "driver", "flavour"),
    [
        ("2.5.1+cpu", None, "cu124"),  # no driver known: the newest build of the line
        ("2.5.1+cpu", "550.54.15", "cu124"),
        ("2.5.1+cpu", "535.183.01", "cu121"),  # the newest one the driver runs
        ("2.5.1+cpu", "520.61.05", "cu118"),
        ("2.7.1+cpu", "550.54.15", "cu118"),  # native cu118 before cu126 under compatibility
        ("2.13.0+cpu", None, "cu130"),
        ("2.13.0+cpu", "580.82.07", "cu130"),
        ("2.13.0+cpu", "570.124.06", "cu126"),  # 2.13 has no cu128
        ("2.13.0+cpu", "470.256.02", "cu126"),  # too old for any: the oldest, after an upgrade
    ],
)
def test_cuda_wheel_fix_keeps_the_version_and_fits_the_driver(version, driver, flavour):
    base = version.split("+")[0]
    fix = diagnosis.cuda_wheel_fix(version, driver)
    assert f"install torch=={base}+{flavour} --index-url {TORCH_INDEX}{flavour}" in fix
    if driver == "470.256.02":
        assert "after upgrading the NVIDIA driver to >= 525.60.13" in fix


@pytest.mark.parametrize("driver", [None, "580.82.07", "575.51.03", "535.183.01", "470.256.02"])
def test_cuda_wheel_fix_agrees_with_setup_and_the_readme_table(driver):
    """The doctor's reinstall line names the build scripts/setup.sh picks for the same
    driver (bundleflow.system.torch_index.choose, whose table README "Setup" prints)."""
    from pathlib import Path

    from bundleflow.system import torch_index

    fix = diagnosis.cuda_wheel_fix("2.13.0", driver)
    choice = torch_index.choose("2.13.0", driver)
    if choice.flavour != "cpu":
        assert f"+{choice.flavour} --index-url {choice.index_url}" in fix
        readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
        assert f"| {choice.flavour} (CUDA " in readme or f"| {choice.flavour}, under" in readme
    else:  # setup installs the CPU build; the doctor still names the CUDA one to aim for
        assert "+cu1" in fix


def test_cuda_wheel_fix_names_the_venv_pip(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "executable", str(tmp_path / ".venv" / "bin" / "python"))
    assert ": .venv/bin/python -m pip install torch==" in diagnosis.cuda_wheel_fix("2.13.0", None)
    monkeypatch.setattr(sys, "executable", "/usr/bin/python3")
    assert ": pip install torch==" in diagnosis.cuda_wheel_fix("2.13.0", None)


@pytest.mark.parametrize("value", ["", "-1"])
def test_cuda_visible_devices_empty_hides_the_gpus(value):
    facts = env(unusable(h100_facts()), CUDA_VISIBLE_DEVICES=value)
    checks = by_name(doctor_checks.run_checks(facts))
    assert checks["CUDA_VISIBLE_DEVICES"].status == FAIL
    assert checks["cuda"].status == FAIL and "hides every GPU" in checks["cuda"].value
    assert "unset CUDA_VISIBLE_DEVICES" in checks["cuda"].fix


def test_cuda_visible_devices_out_of_range():
    facts = env(unusable(h100_facts()), CUDA_VISIBLE_DEVICES="3")
    check = verdict(facts, "CUDA_VISIBLE_DEVICES")
    assert check.status == FAIL and "out of range" in check.value and "GPUs 0..0" in check.value
    assert "unset" in check.fix
    assert verdict(env(h100_facts(), CUDA_VISIBLE_DEVICES="0"), "CUDA_VISIBLE_DEVICES").status == (
        PASS
    )


def test_driver_too_old_for_the_wheel():
    facts = unusable(h100_facts(nvml=replace(h100_facts().nvml, cuda_driver=11080)))
    checks = by_name(doctor_checks.run_checks(facts))
    assert checks["cuda driver"].status == FAIL and "too old" in checks["cuda driver"].value
    assert "11.8" in checks["cuda driver"].value and "12.1" in checks["cuda driver"].value
    assert checks["cuda"].status == FAIL
    for name in ("cuda driver", "cuda"):
        assert "upgrade the NVIDIA driver" in checks[name].fix and "530.30.02" in checks[name].fix
        assert "older CUDA flavour" in checks[name].fix


def test_older_minor_driver_that_works_is_a_warning_only():
    facts = h100_facts(nvml=replace(h100_facts().nvml, cuda_driver=12000))
    check = verdict(facts, "cuda driver")
    assert check.status == WARN and "minor-version compatibility" in check.value


def test_container_without_the_compute_capability():
    facts = unusable(
        env(h100_facts(), NVIDIA_DRIVER_CAPABILITIES="utility"),
        init_error="Found no NVIDIA driver on your system",
    )
    facts = replace(facts, libcuda="libcuda.so.1: cannot open shared object file")
    checks = by_name(doctor_checks.run_checks(facts))
    assert checks["NVIDIA_DRIVER_CAPABILITIES"].status == FAIL
    assert checks["cuda"].status == FAIL and "compute capability" in checks["cuda"].value
    for name in ("NVIDIA_DRIVER_CAPABILITIES", "cuda", "libcuda"):
        assert "nvidia/cuda" in checks[name].fix and "compute,utility" in checks[name].fix


def test_container_started_without_gpus():
    facts = unusable(
        h100_facts(
            nvml=NvmlFacts(ok=False, error="NVMLError_LibraryNotFound: NVML Shared Library"),
            dev_nvidia=[],
            libcuda="libcuda.so.1: cannot open shared object file",
        )
    )
    facts = env(facts, NVIDIA_VISIBLE_DEVICES=None)
    strict = by_name(doctor_checks.run_checks(facts, expect_gpu=True))
    assert strict["cuda"].status == FAIL and "without GPUs" in strict["cuda"].value
    assert "--gpus all" in strict["cuda"].fix and "device reservation" in strict["cuda"].fix
    for name in ("/dev/nvidia*", "NVIDIA_VISIBLE_DEVICES", "nvml"):
        assert strict[name].status == FAIL and "--gpus all" in strict[name].fix
    relaxed = doctor_checks.run_checks(facts)  # no GPU to be seen, none expected: CPU runs are fine
    assert doctor_checks.exit_code(relaxed) == 0
    assert by_name(relaxed)["cuda"].status == WARN


def test_gpu_architecture_missing_from_the_wheel():
    blackwell = {"name": "NVIDIA B200", "capability": (10, 0), "memory_total": 180 << 30}
    facts = h100_facts(torch=replace(h100_facts().torch, devices=[blackwell]))
    check = verdict(facts, "arch")
    assert check.status == FAIL and "sm_100" in check.value
    assert "cu128" in check.fix
    # the same family runs older cubins: sm_86 on the sm_80/sm_86 wheel, sm_89 on sm_86
    assert diagnosis.arch_supported((8, 9), CU121_ARCHES)
    assert not diagnosis.arch_supported((12, 0), CU121_ARCHES)
    assert diagnosis.arch_supported((9, 0), ["sm_80", "sm_90a"])


def test_arch_from_nvml_when_torch_cannot_initialise():
    nvml = replace(h100_facts().nvml, gpus=[replace(h100_facts().nvml.gpus[0], capability=(12, 0))])
    facts = unusable(h100_facts(nvml=nvml))
    assert verdict(facts, "arch").status == FAIL


def test_cuda_home_is_explained_not_blamed(tmp_path):
    facts = env(h100_facts(), CUDA_HOME=str(tmp_path))
    check = verdict(facts, "CUDA_HOME/CUDA_PATH")
    assert check.status == PASS and "not read by torch.cuda.is_available()" in check.value
    missing = verdict(env(h100_facts(), CUDA_PATH="/nope/cuda"), "CUDA_HOME/CUDA_PATH")
    assert (
        missing.status == WARN and "compiling" in missing.value and "does not make" in missing.fix
    )
    assert "not read by" in verdict(h100_facts(), "CUDA_HOME/CUDA_PATH").value


def test_tiny_dev_shm():
    check = verdict(h100_facts(shm_bytes=64 << 20), "/dev/shm")
    assert check.status == WARN and "64 MiB" in check.value
    assert "shm_size" in check.fix and "ipc: host" in check.fix


def test_launch_that_fell_back_to_single_runs():
    facts = h100_facts(launcher=LauncherFacts(world_size=2, num_processes=1))
    check = verdict(facts, "launcher")
    assert check.status == FAIL and "WORLD_SIZE=2" in check.value and "1 process" in check.value
    assert "fix the GPU checks above first" in check.fix
    ok = h100_facts(launcher=LauncherFacts(world_size=2, num_processes=2))
    assert verdict(ok, "launcher").status == PASS


def test_bf16_unsupported():
    old = h100_facts(torch=replace(h100_facts().torch, bf16=False))
    assert verdict(old, "bf16").status == WARN
    requested = env(old, ACCELERATE_MIXED_PRECISION="bf16")
    check = verdict(requested, "bf16")
    assert check.status == FAIL and "fp16" in check.fix


def test_runs_dir_not_writable_and_missing_nvml_package():
    check = verdict(h100_facts(runs_dir=("/ro/runs", False, "exists")), "runs dir")
    assert check.status == FAIL and "BUNDLEFLOW_HOME" in check.fix and "--runs-dir" in check.fix
    no_pkg = NvmlFacts(ok=False, error="pynvml not installed (pip install nvidia-ml-py)")
    assert verdict(h100_facts(nvml=no_pkg), "nvml").status == WARN


# --------------------------------------------------------------------------- probes


class FakeNvml(types.ModuleType):
    """A pynvml stand-in: ``fail_init`` raises like a machine without a driver."""

    class NVMLError_LibraryNotFound(Exception):  # noqa: N801 - pynvml's name
        pass

    def __init__(self, gpus=1, fail_init=False, cuda_driver=12040):
        super().__init__("pynvml")
        self.gpus, self.fail_init, self.cuda_driver = gpus, fail_init, cuda_driver
        self.calls: list[str] = []

    def nvmlInit(self):  # noqa: N802 - pynvml's names
        self.calls.append("init")
        if self.fail_init:
            raise self.NVMLError_LibraryNotFound("NVML Shared Library Not Found")

    def nvmlShutdown(self):  # noqa: N802
        self.calls.append("shutdown")

    def nvmlSystemGetDriverVersion(self):  # noqa: N802
        return "550.54.15"

    def nvmlSystemGetCudaDriverVersion(self):  # noqa: N802
        return self.cuda_driver

    def nvmlDeviceGetCount(self):  # noqa: N802
        return self.gpus

    def nvmlDeviceGetHandleByIndex(self, i):  # noqa: N802
        return i

    def nvmlDeviceGetHandleByUUID(self, uuid):  # noqa: N802
        return 0

    def nvmlDeviceGetName(self, h):  # noqa: N802
        return "NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetUUID(self, h):  # noqa: N802
        return f"GPU-{h}"

    def nvmlDeviceGetMemoryInfo(self, h):  # noqa: N802
        return types.SimpleNamespace(total=80 << 30, used=12 << 30)

    def nvmlDeviceGetUtilizationRates(self, h):  # noqa: N802
        return types.SimpleNamespace(gpu=97, memory=40)

    def nvmlDeviceGetCudaComputeCapability(self, h):  # noqa: N802
        return (9, 0)


def test_probe_nvml_reads_gpus_and_always_shuts_down(monkeypatch):
    fake = FakeNvml(gpus=2)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    facts = doctor.probe_nvml()
    assert facts.ok and facts.driver == "550.54.15" and facts.cuda_driver == 12040
    assert [g.name for g in facts.gpus] == ["NVIDIA H100 80GB HBM3"] * 2
    assert facts.gpus[1].capability == (9, 0) and facts.gpus[1].utilization == 97
    assert fake.calls == ["init", "shutdown"]


def test_probe_nvml_without_driver_or_package_is_a_finding(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(fail_init=True))
    facts = doctor.probe_nvml()
    assert not facts.ok and facts.error.startswith("NVMLError_LibraryNotFound")
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    assert "not installed" in doctor.probe_nvml().error


def test_probe_torch_records_why_cuda_does_not_initialise(monkeypatch):
    def is_available():
        warnings.warn(
            "CUDA initialization: The NVIDIA driver on your system is too old", stacklevel=1
        )
        return False

    def init():
        raise RuntimeError("The NVIDIA driver on your system is too old (found version 11040)")

    monkeypatch.setattr(torch.version, "cuda", "12.1")
    monkeypatch.setattr(torch.cuda, "_is_compiled", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", is_available)
    monkeypatch.setattr(torch.cuda, "init", init)
    facts = doctor.probe_torch()
    assert facts.cuda == "12.1" and facts.compiled and not facts.available
    assert "too old" in facts.init_error and "11040" in facts.init_error


def test_probe_torch_reads_devices(monkeypatch):
    props = types.SimpleNamespace(
        name="NVIDIA H100 80GB HBM3", major=9, minor=0, total_memory=80 << 30, uuid="abc"
    )
    monkeypatch.setattr(torch.version, "cuda", "12.1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: list(CU121_ARCHES))
    facts = doctor.probe_torch()
    assert facts.devices[0]["capability"] == (9, 0) and facts.bf16 is True
    assert facts.arch_list == CU121_ARCHES


def test_filesystem_probes(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("# comment\nexport SECRET_TOKEN=hunter2\nBUNDLEFLOW_HOME = /x\n")
    path, keys = doctor.probe_dotenv()
    assert path == str(tmp_path / ".env") and keys == ["SECRET_TOKEN", "BUNDLEFLOW_HOME"]
    monkeypatch.setenv("BUNDLEFLOW_HOME", str(tmp_path / "home"))
    root, writable, detail = doctor.probe_runs_dir()
    assert root == str(tmp_path / "home" / "runs") and writable and "will be created" in detail
    assert doctor.probe_launcher(None).world_size is None
    assert doctor.probe_launcher("two").error
    assert isinstance(doctor.probe_container(), list)
    assert doctor.probe_shm() is None or doctor.probe_shm() > 0


def test_gather_survives_every_probe_raising(monkeypatch):
    def boom(*a, **k):
        raise OSError("broken")

    for name in dir(doctor):
        if name.startswith("probe_"):
            monkeypatch.setattr(doctor, name, boom)
    facts = doctor.gather()
    checks = doctor_checks.run_checks(facts, expect_gpu=True)
    assert all(c.name != "internal" for c in checks)
    assert by_name(checks)["cuda"].status == FAIL


def test_gather_from_patched_sources_diagnoses_the_hidden_gpus(monkeypatch):
    """End to end through the probes: NVML sees a GPU, CUDA_VISIBLE_DEVICES hides it."""
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(gpus=1))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr(torch.version, "cuda", "12.1")
    monkeypatch.setattr(torch.cuda, "_is_compiled", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "init", lambda: None)
    monkeypatch.setattr(doctor, "probe_dev_nvidia", lambda: ["/dev/nvidia0", "/dev/nvidiactl"])
    monkeypatch.setattr(doctor, "probe_libcuda", lambda: None)
    facts = doctor.gather()
    check = by_name(doctor_checks.run_checks(facts))["cuda"]
    assert check.status == FAIL and "CUDA_VISIBLE_DEVICES=''" in check.value


# --------------------------------------------------------------------------- CLI


def test_doctor_json_shape(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("SECRET_TOKEN=hunter2\n")
    assert main(["doctor", "--json"]) in (0, 1)
    out = capsys.readouterr().out
    payload = json.loads(out)
    assert "hunter2" not in out  # keys only, never values
    assert isinstance(payload["checks"], list) and payload["checks"]
    for check in payload["checks"]:
        assert set(check) == {"name", "status", "value", "fix"}
        assert check["status"] in (PASS, WARN, FAIL)
    names = [c["name"] for c in payload["checks"]]
    for expected in (
        "python",
        "torch",
        "accelerate",
        "torch build",
        "cudnn",
        "nvml",
        "cuda driver",
        "cuda",
        "arch",
        "bf16",
        "CUDA_VISIBLE_DEVICES",
        "NVIDIA_VISIBLE_DEVICES",
        "NVIDIA_DRIVER_CAPABILITIES",
        "container",
        "/dev/nvidia*",
        "/dev/shm",
        "CUDA_HOME/CUDA_PATH",
        "launcher",
        "runs dir",
        ".env",
    ):
        assert expected in names
    env_check = next(c for c in payload["checks"] if c["name"] == ".env")
    assert "SECRET_TOKEN" in env_check["value"]
    assert payload["ok"] == (payload["summary"]["FAIL"] == 0)


def test_doctor_exit_codes(monkeypatch, capsys):
    monkeypatch.setattr(doctor, "gather", lambda **k: h100_facts())
    assert main(["doctor", "--expect-gpu"]) == 0
    out = capsys.readouterr().out
    assert "PASS  cuda" in out and "0 fail" in out
    monkeypatch.setattr(doctor, "gather", lambda **k: unusable(h100_facts(), cuda=None))
    assert main(["doctor"]) == 1
    assert "fix: reinstall the CUDA build: " in (out := capsys.readouterr().out)
    assert "torch==2.5.1+cu124 --index-url https://download.pytorch.org/whl/cu124" in out


def test_a_missing_dotenv_is_no_warning():
    """.env is optional (the defaults work): its absence is a PASS without a fix."""
    check = verdict(h100_facts(dotenv=None), ".env")
    assert (check.status, check.fix) == (PASS, "")
    assert "optional" in check.value
    checks = doctor_checks.run_checks(h100_facts(dotenv=None), expect_gpu=True)
    assert [c for c in checks if c.status != PASS] == []  # a healthy host needs no .env


def test_doctor_expect_gpu_exits_1_without_a_usable_gpu_subprocess(tmp_path):
    """CUDA_VISIBLE_DEVICES='' makes the GPU unusable here and on GPU machines alike."""
    run_env = {"CUDA_VISIBLE_DEVICES": "", "BUNDLEFLOW_HOME": str(tmp_path)}
    out = run_cli("doctor", "--expect-gpu", cwd=tmp_path, env=run_env)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    assert "FAIL  cuda " in out.stdout and "fix:" in out.stdout


# --------------------------------------------------------------------------- the trainer's errors


def test_device_errors_quote_the_doctor(monkeypatch):
    old_driver = unusable(h100_facts(nvml=replace(h100_facts().nvml, cuda_driver=11080)))
    monkeypatch.setattr(devices, "gather", lambda **k: old_driver)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BundleflowError) as err:
        devices.resolve_device("cuda")
    what, fix = str(err.value).splitlines()
    assert what == (
        "--device cuda: the driver supports CUDA 11.8 (driver 550.54.15), older than the "
        "wheel's CUDA 12.1"
    )
    assert fix.startswith("fix: upgrade the NVIDIA driver (>= 530.30.02)")
    with pytest.raises(BundleflowError) as err:
        devices.resolve_device("auto")  # NVML sees a GPU: no silent CPU fallback
    assert "CUDA 11.8" in str(err.value) and "--device cpu" in str(err.value)

    no_gpu = h100_facts(nvml=NvmlFacts(ok=False, error="x"), dev_nvidia=[])
    monkeypatch.setattr(devices, "gather", lambda **k: unusable(no_gpu))
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert devices.resolve_device("auto").device.type == "cpu"


def test_device_refuses_a_gpu_the_wheel_has_no_kernels_for(monkeypatch):
    blackwell = {"name": "NVIDIA B200", "capability": (10, 0), "memory_total": 180 << 30}
    facts = h100_facts(torch=replace(h100_facts().torch, devices=[blackwell]))
    monkeypatch.setattr(devices, "gather", lambda **k: facts)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(BundleflowError) as err:
        devices.resolve_device("cuda")
    what, fix = str(err.value).splitlines()
    assert what.startswith("--device cuda: NVIDIA B200 is sm_100, not in the wheel's")
    assert fix.startswith("fix: ") and "cu128" in fix


# --------------------------------------------------------------------------- training hook


def test_gpu_status_line(monkeypatch):
    assert telemetry.gpu_status_line(torch.device("cpu")) is None
    props = types.SimpleNamespace(name="NVIDIA H100 80GB HBM3", total_memory=80 << 30, uuid="")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda i: 10 << 30)
    fake = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    line = telemetry.gpu_status_line("cuda")
    assert (
        line == "GPU 0 NVIDIA H100 80GB HBM3: util 97%, memory 12.0/80.0 GiB (torch peak 10.0 GiB)"
    )
    assert fake.calls == ["init", "shutdown"]
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(fail_init=True))
    assert "util ?" in telemetry.gpu_status_line("cuda")


# --------------------------------------------------------------------------- compiler, headers


def test_healthy_compiler_and_headers_pass():
    checks = by_name(doctor_checks.run_checks(h100_facts(), expect_gpu=True))
    assert checks["c compiler"] == doctor_checks.Check(
        "c compiler", PASS, "/usr/bin/gcc (Triton builds its CUDA launcher with it)"
    )
    assert checks["python headers"].status == PASS
    assert checks["python headers"].value == "/usr/include/python3.10/Python.h"


def test_missing_compiler_on_cuda_is_a_finding_with_its_fix():
    facts = h100_facts(compiler=replace(GCC, cc=None))
    checks = doctor_checks.run_checks(facts)  # a usable GPU: FAIL even without --expect-gpu
    check = by_name(checks)["c compiler"]
    assert check.status == FAIL
    assert check.value == (
        "none (no gcc or clang on PATH): Triton cannot build its CUDA launcher, so "
        "torch.compile fails and the Stage-2 kernels and Adam run eagerly (about 2x slower steps)"
    )
    assert check.fix == (
        "install a C compiler: sudo apt-get install gcc libc6-dev (Debian/Ubuntu; the image "
        "has them)"
    )
    assert by_name(checks)["python headers"].status == PASS  # one finding, one line
    assert doctor_checks.exit_code(checks) == 1


def test_a_cc_that_is_not_a_compiler_is_named():
    facts = h100_facts(compiler=replace(GCC, cc=None, cc_env="/nonexistent/cc"))
    check = verdict(facts, "c compiler")
    assert check.status == FAIL
    assert check.value.startswith("CC=/nonexistent/cc is not an executable: Triton cannot")
    assert check.fix.startswith("unset CC or point it at a C compiler (CC=gcc)")


def test_a_compiler_without_libc_headers_is_a_finding():
    error = "<stdin>:1:10: fatal error: dlfcn.h: No such file or directory"
    check = verdict(h100_facts(compiler=replace(GCC, cc_error=error)), "c compiler")
    assert check.status == FAIL and error in check.value
    assert check.fix == "install the C library headers: sudo apt-get install libc6-dev"


def test_missing_python_headers_is_a_finding_with_its_fix():
    facts = h100_facts(compiler=replace(GCC, python_h=False))
    checks = by_name(doctor_checks.run_checks(facts))
    check = checks["python headers"]
    assert check.status == FAIL
    assert check.value.startswith("/usr/include/python3.10/Python.h missing: Triton cannot")
    assert check.fix.startswith(
        "install the headers of Python 3.10: sudo apt-get install python3.10-dev"
    )
    assert checks["c compiler"].status == PASS


def test_compiler_findings_warn_without_a_usable_gpu_and_are_na_on_a_cpu_torch():
    no_gpu = unusable(h100_facts(compiler=replace(GCC, cc=None, python_h=False)))
    assert verdict(no_gpu, "c compiler").status == WARN
    assert verdict(no_gpu, "python headers").status == WARN
    assert verdict(no_gpu, "c compiler", expect_gpu=True).status == FAIL
    cpu_torch = h100_facts(compiler=None)
    assert verdict(cpu_torch, "c compiler").value.startswith("n/a (CPU-only torch")
    assert verdict(cpu_torch, "python headers").status == PASS


def test_probe_finds_no_compiler_when_cc_is_bogus_or_none_is_on_path(monkeypatch):
    """The probe itself, on this CPU machine: CC=/nonexistent/cc (the issue's simulation),
    and no gcc/clang on PATH."""
    facts = doctor.probe_compiler({"CC": "/nonexistent/cc"})
    assert facts.cc is None and facts.cc_env == "/nonexistent/cc"
    monkeypatch.setattr(doctor.shutil, "which", lambda name: None)
    facts = doctor.probe_compiler({"CC": None})
    assert facts.cc is None and facts.cc_env is None and facts.cc_error is None


def test_probe_reports_a_compiler_that_cannot_find_libc_headers(tmp_path):
    fake = tmp_path / "cc"
    fake.write_text(
        "#!/bin/sh\necho '<stdin>:1:10: fatal error: dlfcn.h: No such file or directory' >&2\n"
        "exit 1\n"
    )
    fake.chmod(0o755)
    facts = doctor.probe_compiler({"CC": str(fake)})
    assert facts.cc == str(fake)
    assert facts.cc_error == "<stdin>:1:10: fatal error: dlfcn.h: No such file or directory"
    check = doctor_checks.check_compiler(h100_facts(compiler=facts), expect_gpu=True)
    assert check.status == FAIL and "libc6-dev" in check.fix


def test_probe_looks_for_python_h_where_triton_does(monkeypatch, tmp_path):
    import sysconfig

    real = sysconfig.get_paths
    monkeypatch.setattr(
        doctor.sysconfig, "get_paths", lambda *a, **k: {**real(*a, **k), "include": str(tmp_path)}
    )
    facts = doctor.probe_compiler({"CC": "/nonexistent/cc"})
    assert facts.python_include == str(tmp_path) and facts.python_h is False
    (tmp_path / "Python.h").write_text("")
    assert doctor.probe_compiler({"CC": "/nonexistent/cc"}).python_h is True


def test_probe_with_this_machines_compiler():
    import shutil

    if not shutil.which("gcc"):
        pytest.skip("no gcc on this machine")
    facts = doctor.probe_compiler({"CC": None})
    assert facts.cc == shutil.which("gcc") and facts.cc_error is None


def test_gather_probes_the_compiler_only_for_a_cuda_torch(monkeypatch):
    monkeypatch.setattr(doctor, "probe_compiler", lambda env: GCC)
    cpu = TorchFacts(version="2.13.0+cpu", cuda=None, compiled=False, available=False)
    monkeypatch.setattr(doctor, "probe_torch", lambda: cpu)
    assert doctor.gather(launcher=False).compiler is None
    monkeypatch.setattr(doctor, "probe_torch", lambda: replace(cpu, cuda="12.1", compiled=True))
    assert doctor.gather(launcher=False).compiler == GCC
