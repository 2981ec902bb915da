"""Build guard: compile Triton's CUDA helper module the way Triton does at run time.

On the first kernel launch Triton compiles ``backends/nvidia/driver.c`` (its ``cuda_utils``
module) and one ``__triton_launcher`` per kernel signature with a C compiler against
``Python.h`` and its bundled ``cuda.h``. Without a compiler or the Python headers
``torch.compile`` fails and bundleflow runs its eager fallback (about 2x slower steps), so
docker/Dockerfile runs this after installing torch and the build fails instead:

    python docker/check_triton_build.py [--triton-dir DIR]

No GPU is needed: the module is compiled and linked as Triton does, except ``-lcuda`` (the
driver's libcuda is mounted by the NVIDIA Container Toolkit only when a container starts; a
shared object may leave the ``cu*`` symbols to the loader). It uses Triton's own
``triton.runtime.build._build`` when that has the signature of Triton 3.1-3.4, else the same
command line: ``CC`` (else gcc, else clang) ``driver.c -O3 -shared -fPIC -o cuda_utils.so
-I<triton>/backends/nvidia/include -I<build dir> -I<Python include>``.
Exit 0 when it compiled; 1 with the missing piece and its fix otherwise.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

MODULE = "cuda_utils"  # the name Triton gives driver.c's module
BUILD_PARAMS = ["name", "src", "srcdir", "library_dirs", "include_dirs", "libraries"]
FIX_CC = "install a C compiler and the C library headers: apt-get install gcc libc6-dev"
FIX_PY = "install the headers of this Python: apt-get install python3-dev"


class BuildCheckError(Exception):
    """A missing piece, with its fix."""


def triton_root(given: str | None) -> Path:
    if given:
        return Path(given)
    spec = importlib.util.find_spec("triton")  # no import: only where the package lies
    if spec is None or not spec.submodule_search_locations:
        raise BuildCheckError("triton is not installed (torch's CUDA wheels depend on it)")
    return Path(list(spec.submodule_search_locations)[0])


def python_include() -> str:
    """The include directory Triton passes for ``Python.h`` (its scheme rule)."""
    scheme = sysconfig.get_default_scheme()
    if scheme == "posix_local":  # Debian's; Triton maps it the same way
        scheme = "posix_prefix"
    return sysconfig.get_paths(scheme=scheme)["include"]


def c_compiler() -> str | None:
    """The compiler Triton runs: ``$CC``, else gcc, else clang; None when there is none."""
    cc = os.environ.get("CC")
    if cc is not None:
        return shutil.which(cc)
    return shutil.which("gcc") or shutil.which("clang")


def triton_build_function(root: Path):
    """Triton's ``_build`` (loaded from its file, without importing triton), or None when
    it is absent or its parameters are not the ones this check passes."""
    path = root / "runtime" / "build.py"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location("_triton_runtime_build", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    build = getattr(module, "_build", None)
    if build is None or list(inspect.signature(build).parameters)[:6] != BUILD_PARAMS:
        return None
    return build


def compile_driver(root: Path, workdir: Path) -> tuple[Path, str]:
    """Compile ``driver.c`` into ``workdir``; the shared object and how it was built."""
    driver_c = root / "backends" / "nvidia" / "driver.c"
    include = root / "backends" / "nvidia" / "include"
    if not driver_c.is_file() or not (include / "cuda.h").is_file():
        raise BuildCheckError(f"{driver_c} or {include}/cuda.h missing: not a CUDA Triton")
    cc = c_compiler()
    if cc is None:
        given = os.environ.get("CC")
        what = f"CC={given} is not an executable" if given else "no gcc or clang on PATH"
        raise BuildCheckError(f"no C compiler ({what}): Triton cannot build its launcher")
    headers = Path(python_include())
    if not (headers / "Python.h").is_file():
        raise BuildCheckError(f"{headers}/Python.h not found: no Python headers ({FIX_PY})")
    src = workdir / "main.c"
    shutil.copyfile(driver_c, src)
    build = triton_build_function(root)
    try:
        if build is not None:
            so = Path(build(MODULE, str(src), str(workdir), [], [str(include)], []))
            how = f"triton.runtime.build._build with {cc}"
        else:
            so = workdir / f"{MODULE}{sysconfig.get_config_var('EXT_SUFFIX')}"
            command = [cc, str(src), "-O3", "-shared", "-fPIC", "-o", str(so)]
            command += [f"-I{include}", f"-I{workdir}", f"-I{headers}"]
            subprocess.run(command, check=True)
            how = " ".join(command)
    except (subprocess.CalledProcessError, RuntimeError) as err:
        raise BuildCheckError(
            f"compiling {driver_c} failed ({err}); compiler output above"
        ) from err
    if not so.is_file() or f"PyInit_{MODULE}".encode() not in so.read_bytes():
        raise BuildCheckError(f"{so} was not built or exports no PyInit_{MODULE}")
    return so, how


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--triton-dir", help="the triton package directory (default: installed)")
    args = parser.parse_args(argv)
    try:
        root = triton_root(args.triton_dir)
        with tempfile.TemporaryDirectory() as tmp:
            so, how = compile_driver(root, Path(tmp))
            size = so.stat().st_size
    except BuildCheckError as err:
        fix = FIX_PY if "Python.h" in str(err) else FIX_CC
        sys.stderr.write(f"check_triton_build: FAILED: {err}\n  fix: {fix}\n")
        return 1
    sys.stdout.write(f"check_triton_build: ok: {root}/backends/nvidia/driver.c -> {so.name} ")
    sys.stdout.write(f"({size} bytes; {how})\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
