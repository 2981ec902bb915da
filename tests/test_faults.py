"""Faults: a writer killed at random moments, a full disk, an unwritable runs directory,
a malicious pickle, two runs in one runs directory, two processes training one flow.

Every test here prints what it tried and what survived (``-s`` or ``-rA`` shows it).
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch

from bundleflow.errors import BundleflowError
from bundleflow.maths.flow import load_reference_flow
from bundleflow.train.checkpoint import (
    MANIFEST,
    latest,
    read_checkpoint,
    read_manifest,
    write_checkpoint,
)
from bundleflow.train.run import new_run_dir
from bundleflow.valuations.io import load_dataset

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
KILLS = 100

# A Stage-2 checkpoint at the brief's size: menu m=20, J=1000, D=8 with its Adam state.
M, J, D = 20, 1000, 8

CONTENT = textwrap.dedent(
    f"""
    import torch

    def content(step):
        g = torch.Generator().manual_seed(step)
        means = torch.randn({J}, {D}, {M}, generator=g)
        logits = torch.randn({J}, {D}, generator=g)
        prices = torch.rand({J}, generator=g)
        return {{
            "menu": {{"means": means, "logits": logits, "prices": prices}},
            "optimizer": {{
                "0.exp_avg": torch.randn({J}, {D}, {M}, generator=g),
                "0.exp_avg_sq": torch.rand({J}, {D}, {M}, generator=g),
                "0.step": torch.tensor(float(step)),
            }},
            "rng": {{"batch": torch.randint(0, 255, (5056,), dtype=torch.uint8, generator=g)}},
        }}
    """
)

# A zygote: imports torch once, then forks one writer per line on stdin ("DIR START") and
# answers with the writer's pid. Forking saves a ~2 s interpreter start per kill; the zygote
# itself never runs a torch op, so its children start with a clean thread pool.
ZYGOTE = CONTENT + textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from bundleflow.train.checkpoint import prune, replace_checkpoint, write_checkpoint

    def writer(ckpt_dir, step):
        torch.set_num_threads(1)
        while True:
            parts = content(step)
            write_checkpoint(ckpt_dir / f"step-{step:09d}", parts, step=step,
                             extra={"loop": {"step": step}})
            prune(ckpt_dir, 2)
            if step % 3 == 0:
                replace_checkpoint(ckpt_dir.parent / "best", {"menu": parts["menu"]}, step=step)
            step += 1

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    for line in sys.stdin:
        directory, start = line.split()
        pid = os.fork()
        if pid == 0:
            try:
                writer(Path(directory), int(start))
            finally:
                os._exit(1)
        print(pid, flush=True)
    """
)


def _content(step: int) -> dict:
    namespace: dict = {}
    exec(CONTENT, namespace)  # the same definition the writer uses
    return namespace["content"](step)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[n].keys() == b[n].keys() and all(torch.equal(a[n][k], b[n][k]) for k in a[n]) for n in a
    )


def _wait_dead(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.002)
    raise AssertionError(f"writer {pid} did not die")


@pytest.fixture
def fast_dir(tmp_path):
    """A directory on tmpfs when there is one. A SIGKILL loses nothing the kernel already
    has (page cache), so fsync's cost (~0.2 s a checkpoint on this disk, and a process in
    fsync dies only when it returns) buys no realism here, only minutes."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    path = Path(tempfile.mkdtemp(prefix="bundleflow-kill-", dir=shm))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_writer_killed_at_random_moments_always_resumes(fast_dir):
    """SIGKILL a checkpoint writer 100 times (seeded moments); after every kill the resume
    logic finds a verified checkpoint holding exactly what was written for its step."""
    tmp_path = fast_dir
    ckpt_dir = tmp_path / "checkpoints"
    write_checkpoint(ckpt_dir / "step-000000000", _content(0), step=0)
    zygote = subprocess.Popen(
        [PYTHON, "-c", ZYGOTE],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    rng = random.Random(10)
    expected = {0: _content(0)}
    mid_write = resumed_from_older = best_checked = 0
    step = 0
    try:
        for _ in range(KILLS):
            zygote.stdin.write(f"{ckpt_dir} {step + 1}\n")
            zygote.stdin.flush()
            pid = int(zygote.stdout.readline())
            time.sleep(rng.uniform(0.0, 0.1))
            os.kill(pid, signal.SIGKILL)
            _wait_dead(pid)
            mid_write += any(f".{pid}." in p.name for p in tmp_path.rglob(".*"))
            found = latest(ckpt_dir)
            assert found is not None
            components, manifest = read_checkpoint(found)
            got = manifest["step"]
            assert got >= step, "a newer complete checkpoint was lost"
            if got not in expected:
                expected = {got: _content(got)}  # keep memory flat
            assert _same(components, expected[got]), f"step {got}: content differs"
            newest = max(int(p.name[5:]) for p in ckpt_dir.glob("step-*"))
            resumed_from_older += newest != got
            if (tmp_path / "best").exists() or (tmp_path / ".best.new").exists():
                best, best_manifest = read_checkpoint(tmp_path / "best")
                assert _same(best, {"menu": _content(best_manifest["step"])["menu"]})
                best_checked += 1
            step = got
    finally:
        zygote.kill()
        zygote.wait()
    print(  # noqa: T201 - the fault counts are the test's report
        f"\n{KILLS} SIGKILLs: resumed every time, last step {step}; {mid_write} kills left a "
        f"partial temporary write; {resumed_from_older} resumes skipped a newer incomplete "
        f"checkpoint; best checked {best_checked} times"
    )
    assert step > KILLS // 2, "the writer hardly ever completed a checkpoint"
    assert mid_write > 10, "too few kills landed inside a write to prove anything"


# --------------------------------------------------------------------------- full disk

FULL_DISK = textwrap.dedent(
    """
    import json, os, resource, signal, sys
    from pathlib import Path
    import torch
    from bundleflow.train.checkpoint import (
        latest, read_checkpoint, replace_checkpoint, write_checkpoint,
    )
    from bundleflow.errors import BundleflowError
    from bundleflow.evaluation.mechanism import FrozenMechanism
    from bundleflow.train.run import Run
    from bundleflow.train.config import Config
    from bundleflow.valuations.io import save_dataset

    root = Path(sys.argv[1])
    small = {"menu": {"x": torch.ones(10)}}
    big = {"menu": {"x": torch.ones(1_000_000)}, "optimizer": {"y": torch.ones(10)}}
    write_checkpoint(root / "checkpoints" / "step-000000001", small, step=1)
    replace_checkpoint(root / "best", small, step=1)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
    errors = {}
    def attempt(name, fn):
        try:
            fn()
            errors[name] = None
        except BundleflowError as err:
            errors[name] = str(err)
    attempt("checkpoint", lambda: write_checkpoint(
        root / "checkpoints" / "step-000000002", big, step=2))
    attempt("best", lambda: replace_checkpoint(root / "best", big, step=2))
    run = Run(dir=root, config=Config())
    attempt("run.json", lambda: run.write_json("run.json", {"x": "y" * 300_000}))
    attempt("metrics", lambda: run.metrics(x="y" * 300_000))
    mech = FrozenMechanism(torch.zeros(200, 8, 50, dtype=torch.uint8), torch.ones(200, 8) / 8,
                           torch.ones(200), torch.zeros(200, 8, 50), mix_temp=1.0)
    attempt("mechanism", lambda: mech.save(root / "mechanism.safetensors"))
    vals = torch.zeros(20000, 2, 3); vals[:, 0, 0] = 1; vals[:, 0, -1] = 1
    attempt("data", lambda: save_dataset(root / "data.safetensors", vals, {}))
    attempt("data .pt", lambda: save_dataset(root / "data.pt", vals, {}))
    found = latest(root / "checkpoints")
    step = read_checkpoint(found)[1]["step"]
    best_step = read_checkpoint(root / "best")[1]["step"]
    print(json.dumps({"errors": errors, "latest": found.name, "step": step,
                      "best_step": best_step}))
    """
)


def test_full_disk_is_one_clear_error_and_keeps_the_last_checkpoint(tmp_path):
    out = subprocess.run(
        [PYTHON, "-c", FULL_DISK, str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for name, message in result["errors"].items():
        assert message is not None, f"{name}: the over-limit write did not fail"
        # torch.save's zip writer reports no errno: "file write failed" instead
        reason = "file write failed" if name == "data .pt" else "File too large"
        assert reason in message and "\n" not in message, message
        assert "free disk space" in message, message
    assert result["step"] == 1 and result["latest"] == "step-000000001"
    assert result["best_step"] == 1
    leftovers = [p.name for p in tmp_path.rglob(".*")]
    assert leftovers == [], f"temporary files left behind: {leftovers}"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000000001"]
    assert not (tmp_path / "mechanism.safetensors").exists()
    assert not (tmp_path / "data.pt").exists()
    print(f"\nfull disk: {len(result['errors'])} writers refused cleanly, e.g.:")  # noqa: T201
    print(result["errors"]["checkpoint"])  # noqa: T201


# --------------------------------------------------------------------------- unwritable dir

AS_NOBODY = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    import torch
    from bundleflow.train.checkpoint import latest, read_checkpoint, write_checkpoint
    from bundleflow.errors import BundleflowError
    from bundleflow.train.run import new_run_dir
    # Imports first: the interpreter's own files may live where nobody cannot read.
    os.setgroups([]); os.setgid(65534); os.setuid(65534)

    root = Path(sys.argv[1])
    errors = {}
    for name, fn in {
        "checkpoint": lambda: write_checkpoint(
            root / "checkpoints" / "step-000000002", {"m": {"x": torch.ones(3)}}, step=2),
        "run dir": lambda: new_run_dir(root / "runs", "run"),
        "runs root": lambda: new_run_dir(root / "runs" / "new", "run"),
    }.items():
        try:
            fn()
            errors[name] = None
        except BundleflowError as err:
            errors[name] = str(err)
    found = latest(root / "checkpoints")
    print(json.dumps({"errors": errors, "step": read_checkpoint(found)[1]["step"]}))
    """
)


@pytest.fixture
def world_readable_dir():
    """A directory under /tmp that an unprivileged user can traverse but not write."""
    path = Path(tempfile.mkdtemp(prefix="bundleflow-ro-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _can_drop_privileges() -> str | None:
    if os.geteuid() != 0:
        return "not root: cannot switch to an unprivileged user (run the tests as root)"
    try:
        import pwd

        pwd.getpwuid(65534)
    except KeyError:
        return "no user 65534 (nobody) on this machine"
    return None


def test_unwritable_runs_dir_is_one_clear_error(world_readable_dir):
    reason = _can_drop_privileges()
    if reason:
        pytest.skip(reason)
    root = world_readable_dir
    write_checkpoint(root / "checkpoints" / "step-000000001", {"m": {"x": torch.ones(3)}}, step=1)
    (root / "runs").mkdir(mode=0o755)
    before = {p.name: p.stat().st_mtime_ns for p in root.rglob("*")}
    out = subprocess.run(
        [PYTHON, "-c", AS_NOBODY, str(root)], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for name, message in result["errors"].items():
        assert message is not None, f"{name}: an unwritable directory was written"
        assert "\n" not in message and ("writable" in message or "--runs-dir" in message)
    assert result["step"] == 1
    assert {p.name: p.stat().st_mtime_ns for p in root.rglob("*")} == before
    print(f"\nunwritable directory (as nobody): {result['errors']}")  # noqa: T201


def test_cli_unwritable_runs_dir_exits_2_with_one_line(world_readable_dir):
    reason = _can_drop_privileges()
    if reason:
        pytest.skip(reason)
    cache = world_readable_dir / "cache"
    cache.mkdir(mode=0o777)
    code = (
        "import os, sys; from bundleflow.cli.app import build_parser, main; build_parser(); "
        "import bundleflow.train.stage2, accelerate, dotenv, ctypes; "
        "os.setgroups([]); os.setgid(65534); os.setuid(65534); sys.exit(main(sys.argv[1:]))"
    )
    env = {**os.environ, "BUNDLEFLOW_CACHE": str(cache), "HOME": str(cache)}
    out = subprocess.run(
        [PYTHON, "-c", code, "train", "--preset", "default", "--device", "cpu", "--no-progress",
         "--runs-dir", str(world_readable_dir / "runs")],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=120,
    )  # fmt: skip
    errors = [line for line in out.stderr.splitlines() if "error" in line.lower()]
    assert out.returncode == 2, out.stderr
    assert len(errors) == 1 and errors[0].startswith("bundleflow: error:"), out.stderr
    assert "Traceback" not in out.stderr
    assert not (world_readable_dir / "runs").exists()


# --------------------------------------------------------------------------- malicious pickle


class _Evil:
    """Unpickling this would create the marker file (a stand-in for os.system)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_files(tmp_path: Path) -> dict[str, Path]:
    marker = tmp_path / "PWNED"
    evil = _Evil(marker)
    files = {}
    files["torch .pt (zip)"] = tmp_path / "evil.pt"
    torch.save({"valuations": torch.zeros(2, 2, 3), "payload": evil}, files["torch .pt (zip)"])
    files["legacy pickle .pt"] = tmp_path / "legacy.pt"
    files["legacy pickle .pt"].write_bytes(pickle.dumps(evil, protocol=2))
    files["torch .pth flow"] = tmp_path / "flow.pth"
    torch.save({"fc1.weight": evil}, files["torch .pth flow"])
    files["zip holding a .pt"] = tmp_path / "data.zip"
    with zipfile.ZipFile(files["zip holding a .pt"], "w") as archive:
        archive.write(files["torch .pt (zip)"], "inner/valuations.pt")
    files["torch archive named .zip"] = tmp_path / "archive.zip"
    shutil.copy(files["torch .pt (zip)"], files["torch archive named .zip"])
    files["no suffix"] = tmp_path / "valuations"
    shutil.copy(files["legacy pickle .pt"], files["no suffix"])
    return files


def test_malicious_pickle_is_refused_by_every_reader(tmp_path):
    marker = tmp_path / "PWNED"
    # Sanity: the payload is live (plain pickle runs it).
    pickle.loads(pickle.dumps(_Evil(marker)))
    assert marker.exists()
    marker.unlink()
    files = _evil_files(tmp_path)
    refused = []
    for name, path in files.items():
        with pytest.raises(BundleflowError) as err:
            load_dataset(path)
        assert "\n" not in str(err.value)
        refused.append(f"load_dataset({name})")
        if path.suffix in (".pt", ".pth"):
            with pytest.raises(BundleflowError):
                load_reference_flow(path)
            refused.append(f"load_reference_flow({name})")
    # A checkpoint whose component is a pickle (checksum made to match) is refused too.
    ckpt = write_checkpoint(tmp_path / "ckpt", {"menu": {"x": torch.ones(2)}}, step=1)
    shutil.copy(files["torch .pt (zip)"], ckpt / "menu.safetensors")
    manifest = read_manifest(ckpt)
    from bundleflow.atomic import file_sha256

    manifest["files"]["menu.safetensors"] = file_sha256(ckpt / "menu.safetensors")
    (ckpt / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleflowError):
        read_checkpoint(ckpt)
    refused.append("read_checkpoint(pickle as a component)")
    assert not marker.exists(), "a pickle ran code"
    print(f"\nmalicious pickle refused by {len(refused)} readers: {refused}")  # noqa: T201


def test_package_loads_no_pickle_without_weights_only():
    """Every torch.load in the package passes weights_only=True."""
    calls = []
    for path in (REPO / "bundleflow").rglob("*.py"):
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if "torch.load(" in line:
                calls.append((path.name, lineno, "weights_only=True" in line))
            assert "pickle.load" not in line, f"{path}:{lineno} unpickles"
    assert calls and all(ok for *_, ok in calls), calls


# --------------------------------------------------------------------------- two runs


def test_run_dirs_are_unique_under_concurrency(tmp_path):
    """32 threads start a run with the same name in the same second: 32 directories."""
    barrier = threading.Barrier(32)
    made, lock = [], threading.Lock()

    def start():
        barrier.wait()
        path = new_run_dir(tmp_path, "same")
        with lock:
            made.append(path)

    threads = [threading.Thread(target=start) for _ in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(made)) == 32 and len(list(tmp_path.iterdir())) == 32


def test_run_dir_retries_a_collision(tmp_path, monkeypatch):
    import uuid

    ids = iter(["a" * 32, "a" * 32, "b" * 32])
    monkeypatch.setattr(uuid, "uuid4", lambda: type("U", (), {"hex": next(ids)})())
    first = new_run_dir(tmp_path, "x")
    second = new_run_dir(tmp_path, "x")
    assert first != second and second.name.endswith("bbbbbb")


STAGE1 = textwrap.dedent(
    """
    import json, sys, torch
    torch.set_num_threads(1)
    from bundleflow.train.config import FlowConfig, Stage1Config
    from bundleflow.train.stage1 import get_flow
    cfg = Stage1Config(steps=150, batch_size=64, log_every=50)
    field, info = get_flow(4, FlowConfig(hidden=16), cfg, torch.device("cpu"),
                           show_progress=False)
    print(json.dumps({"cached": info["cached"], "path": info["path"],
                      "w": field.fc1.weight.sum().item()}))
    """
)


def test_two_processes_share_one_stage1_cache_entry(tmp_path):
    env = {**os.environ, "BUNDLEFLOW_CACHE": str(tmp_path)}
    procs = [
        subprocess.Popen(
            [PYTHON, "-c", STAGE1],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env=env,
        )  # fmt: skip
        for _ in range(2)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert sorted(r["cached"] for r in results) == [False, True], results
    assert results[0]["path"] == results[1]["path"]
    assert results[0]["w"] == results[1]["w"]
    entries = [p.name for p in (tmp_path / "flows").iterdir()]
    assert sorted(e.endswith(".lock") for e in entries) == [False, True], entries
    read_checkpoint(Path(results[0]["path"]))
