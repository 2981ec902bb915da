"""Which torch build fits this machine: the NVIDIA driver -> wheel index table that
scripts/setup.sh and `bundleflow doctor` share (README "Setup" prints it).

Standard library only, and no bundleflow imports: setup.sh runs this file before torch or
bundleflow is installed::

    python3 bundleflow/system/torch_index.py --spec torch==2.13.0     # pip arguments on stdout

Sources (checked 2026-12):
- the CUDA builds of each torch release line: PyTorch RELEASE.md, "Release Compatibility
  Matrix", column "Stable CUDA" (experimental builds are left out: 2.13's cu132);
- each CUDA's minimum Linux driver: the CUDA Toolkit release notes, table "CUDA Toolkit and
  Corresponding Driver Versions" (the GA release of that CUDA);
- minor-version compatibility (a CUDA 12.x build on any driver >= 525.60.13, 13.x on >= 580,
  without PTX JIT): the same notes, and NVIDIA's data-centre "Supported Drivers" page;
- CUDA 13 builds have no Maxwell, Pascal or Volta kernels (sm_50..sm_70): RELEASE.md's
  "PyTorch CUDA Support Matrix" (13.0: Turing sm_75 and newer).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass

TORCH_INDEX = "https://download.pytorch.org/whl/"
DEFAULT_TORCH = "2.13.0"  # scripts/setup.sh's default TORCH_SPEC

# Stable CUDA builds per torch release line; lines before the first / after the last use
# the first / last row.
TORCH_CUDA_FLAVOURS: dict[tuple[int, int], tuple[str, ...]] = {
    (2, 5): ("cu118", "cu121", "cu124"),
    (2, 6): ("cu118", "cu124"),
    (2, 7): ("cu118", "cu126"),
    (2, 8): ("cu126", "cu128"),
    (2, 9): ("cu126", "cu128"),
    (2, 10): ("cu126", "cu128"),
    (2, 11): ("cu126", "cu128", "cu130"),
    (2, 12): ("cu126", "cu130"),
    (2, 13): ("cu126", "cu130"),
    (2, 14): ("cu126", "cu130", "cu132"),
}
# The driver each CUDA needs natively (Linux x86_64). 12.8: 12.8 Update 1, the image's
# cu128 base. A CUDA without an entry (13.2) is never chosen by driver.
MIN_DRIVER: dict[str, str] = {
    "11.8": "520.61.05",
    "12.1": "530.30.02",
    "12.4": "550.54.14",
    "12.6": "560.28.03",
    "12.8": "570.124.06",
    "13.0": "580.65.06",
}
# CUDA minor-version compatibility: a build of CUDA major M runs on these drivers.
MINOR_COMPAT: dict[int, str] = {11: "450.80.02", 12: "525.60.13", 13: "580.65.06"}
OLDEST_CUDA13_ARCH = (7, 5)  # Turing


@dataclass(frozen=True)
class Choice:
    """A torch build: ``flavour`` is ``cpu`` or ``cuXYZ``; ``why`` says why, in one line."""

    flavour: str
    why: str
    warning: str = ""  # set when the GPU will not be used although there is one

    @property
    def index_url(self) -> str:
        return TORCH_INDEX + self.flavour


def version_tuple(version: str) -> tuple[int, ...]:
    """``"550.54.15"`` -> ``(550, 54, 15)``."""
    return tuple(int(x) for x in re.findall(r"\d+", version))


def flavour_cuda(flavour: str) -> str:
    """``"cu126"`` -> ``"12.6"``."""
    digits = flavour[2:]
    return f"{digits[:-1]}.{digits[-1]}"


def release_line(torch_version: str) -> tuple[int, int]:
    lines = sorted(TORCH_CUDA_FLAVOURS)
    match = re.match(r"(\d+)\.(\d+)", torch_version)
    line = (int(match[1]), int(match[2])) if match else lines[-1]
    return min(max(line, lines[0]), lines[-1])


def cuda_flavours(torch_version: str) -> tuple[str, ...]:
    """The stable CUDA builds of a torch version's release line, oldest first."""
    return TORCH_CUDA_FLAVOURS[release_line(torch_version)]


def choose(
    torch_version: str, driver: str | None, capabilities: list[tuple[int, int]] | None = None
) -> Choice:
    """The newest CUDA build of ``torch_version`` that ``driver`` runs natively, else one it
    runs under minor-version compatibility, else the CPU build. ``driver`` is None when there
    is no NVIDIA driver; ``capabilities`` are the GPUs' compute capabilities, if known."""
    base = torch_version.split("+")[0]
    if driver is None:
        return Choice("cpu", "no NVIDIA driver: nvidia-smi is missing or fails")
    flavours = list(cuda_flavours(base))
    dropped = ""
    if capabilities and min(capabilities) < OLDEST_CUDA13_ARCH:
        major, minor = min(capabilities)
        old = [f for f in flavours if int(flavour_cuda(f).split(".")[0]) >= 13]
        flavours = [f for f in flavours if f not in old]
        if old:
            dropped = f"; not {'/'.join(old)}: no sm_{major}{minor} kernels in CUDA 13 builds"
    have = version_tuple(driver)
    native = [f for f in flavours if f"{flavour_cuda(f)}" in MIN_DRIVER]
    native = [f for f in native if have >= version_tuple(MIN_DRIVER[flavour_cuda(f)])]
    if native:
        best = native[-1]
        need = MIN_DRIVER[flavour_cuda(best)]
        return Choice(
            best,
            f"driver {driver} >= {need} (CUDA {flavour_cuda(best)}): the newest CUDA build of "
            f"torch {base} it runs{dropped}",
        )
    for flavour in flavours:
        major = int(flavour_cuda(flavour).split(".")[0])
        if major in MINOR_COMPAT and have >= version_tuple(MINOR_COMPAT[major]):
            need = MIN_DRIVER.get(flavour_cuda(flavour), "a newer driver")
            return Choice(
                flavour,
                f"driver {driver} < {need}: CUDA {flavour_cuda(flavour)} runs under CUDA "
                f"{major} minor-version compatibility (>= {MINOR_COMPAT[major]}; no PTX JIT); "
                f"upgrade the driver to >= {need} for full support{dropped}",
            )
    oldest = min(
        (MINOR_COMPAT[int(flavour_cuda(f).split(".")[0])] for f in flavours), key=version_tuple
    )
    return Choice(
        "cpu",
        f"driver {driver} is older than every CUDA build of torch {base} needs (>= {oldest})",
        f"the GPU will not be used: upgrade the NVIDIA driver to >= {oldest}",
    )


def driver_table(torch_version: str = DEFAULT_TORCH) -> str:
    """The README's table: which build :func:`choose` picks for which driver."""
    base = torch_version.split("+")[0]
    flavours = cuda_flavours(base)
    rows = [
        "| NVIDIA driver (`nvidia-smi`) | torch " + base + " build | index |",
        "|---|---|---|",
        f"| none, or `nvidia-smi` fails | CPU | `{TORCH_INDEX}cpu` |",
    ]
    known = [f for f in flavours if flavour_cuda(f) in MIN_DRIVER]
    for flavour in reversed(known):
        cuda = flavour_cuda(flavour)
        note = " (every GPU sm_75 or newer)" if int(cuda.split(".")[0]) >= 13 else ""
        rows.append(f"| >= {MIN_DRIVER[cuda]}{note} | {flavour} (CUDA {cuda}) | "
                    f"`{TORCH_INDEX}{flavour}` |")  # fmt: skip
    oldest = known[0]
    major = int(flavour_cuda(oldest).split(".")[0])
    rows.append(
        f"| {MINOR_COMPAT[major]} to {MIN_DRIVER[flavour_cuda(oldest)]} | {oldest}, under CUDA "
        f"{major} minor-version compatibility | `{TORCH_INDEX}{oldest}` |"
    )
    rows.append(f"| older than {MINOR_COMPAT[major]} | CPU, with a warning | `{TORCH_INDEX}cpu` |")
    return "\n".join(rows)


# --------------------------------------------------------------------------- the machine


def query_nvidia_smi(command: str = "nvidia-smi") -> tuple[str | None, list[tuple[int, int]]]:
    """The driver version and the GPUs' compute capabilities, or (None, []) when nvidia-smi
    is missing or fails (no driver, or a driver that cannot talk to a GPU)."""
    for fields in ("driver_version,compute_cap", "driver_version"):
        try:
            out = subprocess.run(
                [command, f"--query-gpu={fields}", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
            )
        except (OSError, subprocess.SubprocessError):
            return None, []
        rows = [[c.strip() for c in line.split(",")] for line in out.stdout.splitlines() if line]
        if out.returncode == 0 and rows and re.fullmatch(r"\d+(\.\d+)+", rows[0][0]):
            caps = []
            for row in rows:
                if len(row) > 1 and re.fullmatch(r"\d+\.\d+", row[1]):
                    caps.append(tuple(int(x) for x in row[1].split(".")))
            return rows[0][0], caps
    return None, []


def unreachable(url: str, timeout: float = 5.0) -> str | None:
    """Why ``url`` cannot be read, or None when it answers (any HTTP status is an answer)."""
    try:
        urllib.request.urlopen(url, timeout=timeout).close()
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, OSError, ValueError) as err:
        return str(getattr(err, "reason", err))
    return None


def pip_arguments(
    spec: str, choice: Choice, index_base: str = TORCH_INDEX
) -> tuple[list[str], str]:
    """``pip install`` arguments for ``spec`` from the chosen index, and what was done; PyPI
    (pip's configured index) when that index does not answer."""
    index = index_base + choice.flavour
    why_not = unreachable(index + "/torch/")
    if why_not is None:
        return [spec, "--index-url", index], f"installing {spec} from {index}"
    return [spec], (
        f"{index} is unreachable ({why_not}): installing {spec} from pip's own index instead "
        "(on Linux, PyPI's torch is a CUDA build of several GB; it runs on the CPU too)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", default=f"torch=={DEFAULT_TORCH}", help="the pip requirement")
    parser.add_argument("--nvidia-smi", default="nvidia-smi", help="the nvidia-smi to ask")
    parser.add_argument("--index-base", default=TORCH_INDEX, help=argparse.SUPPRESS)
    parser.add_argument("--table", action="store_true", help="print the README table and exit")
    args = parser.parse_args(argv)
    if args.table:
        sys.stdout.write(driver_table() + "\n")
        return 0
    pinned = re.fullmatch(r"torch==([0-9][0-9a-z.]*)(?:\+(\w+))?", args.spec.strip())
    if pinned is None:  # a range or another package: pip decides, as before
        sys.stderr.write(f"setup: {args.spec} is not torch==VERSION: pip's own index decides\n")
        sys.stdout.write(args.spec + "\n")
        return 0
    version, local = pinned.groups()
    if local:
        choice = Choice(local, f"TORCH_SPEC names the {local} build")
    else:
        driver, caps = query_nvidia_smi(args.nvidia_smi)
        choice = choose(version, driver, caps)
    pip_args, done = pip_arguments(args.spec, choice, args.index_base)
    sys.stderr.write(f"setup: torch {version}: the {choice.flavour} build ({choice.why})\n")
    if choice.warning:
        sys.stderr.write(f"setup: WARNING: {choice.warning}\n")
    sys.stderr.write(f"setup: {done}\n")
    sys.stdout.write("\n".join(pip_args) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
