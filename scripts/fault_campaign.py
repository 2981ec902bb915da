"""Faults through a whole run, counted (issue 28). CPU, the tiny preset, two processes.

    python scripts/fault_campaign.py [--trials 20] [--disk-trials 5] [--cache-trials 3] \
        [--only kill,disk,cache] [--workdir DIR]

kill   SIGKILL to a random rank at a random moment of Stage 2 of a two-process run, then
       --resume on one process (even trials) or two (odd): the run must finish with the menu
       of an uninterrupted two-process run (bit for bit on two processes; on one, within
       float summation order: prices to 1e-5 of their scale, test revenue to 1e-5).
disk   ENOSPC injected at the atomic writer (every fsync fails) once the Stage-2 checkpoint
       of step 10, 20, 30 or 40 (at random) exists: one clear error (exit 2, no traceback),
       the last checkpoint intact, and --resume with space back ends with the uninterrupted
       run's menu, bit for bit.
cache  a damaged Stage-1 cache entry (one process and two) and a damaged data-cache entry:
       named in a warning, rebuilt, and the run ends with the undamaged run's menu (bit for
       bit; within summation order where two processes rebuild the flow with DDP).

Prints one line per trial and a JSON summary (the counts) last.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bundleflow.train.checkpoint import latest, read_checkpoint

BIN = Path(sys.executable).parent
ARGS = ["train", "--preset", "tiny", "--device", "cpu", "--no-progress"]
SETS = ["menu.size=33", "stage2.steps=60", "stage2.eval_every=20", "stage2.checkpoint_every=10"]
REL = 1e-5  # two layouts differ by float summation order (tests/test_distributed.py)
ENOSPC_AFTER_CHECKPOINT = """
import errno, os, sys
from pathlib import Path
import bundleflow.atomic as atomic
runs, after = Path(sys.argv[1]), int(sys.argv[2])
real = atomic.os.fsync
class _Os:
    def __getattr__(self, name):
        return getattr(os, name)
    @staticmethod
    def fsync(fd):
        steps = [int(p.parent.name[5:]) for p in runs.glob("*/checkpoints/step-*/manifest.json")]
        if steps and max(steps) >= after:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)
atomic.os = _Os()
from bundleflow.cli.app import main
sys.exit(main(sys.argv[3:]))
"""


def _env(work: Path) -> dict:
    return {
        **os.environ,
        "BUNDLEFLOW_CACHE": str(work / "cache"),
        "ACCELERATE_USE_CPU": "1",
        "OMP_NUM_THREADS": "1",
    }


def _sets(items: list[str]) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmd(nproc: int, tail: list[str]) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "bundleflow", *tail]
    return [str(BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_port",
            str(_port()), "-m", "bundleflow", *tail]  # fmt: skip


def _train(nproc: int, runs: Path, env: dict, extra=()) -> subprocess.CompletedProcess:
    tail = [*ARGS, "--runs-dir", str(runs), *_sets(SETS), *extra]
    return subprocess.run(_cmd(nproc, tail), env=env, capture_output=True, text=True)


def _resume(nproc: int, run: Path, env: dict) -> subprocess.CompletedProcess:
    tail = ["train", "--resume", str(run), "--no-progress"]
    return subprocess.run(_cmd(nproc, tail), env=env, capture_output=True, text=True)


def _run_dir(runs: Path) -> Path:
    (run,) = [p for p in runs.iterdir() if p.is_dir()]
    return run


def _menu(run: Path) -> tuple[dict, float]:
    """The last checkpoint's whole menu and the run's test revenue."""
    menu = read_checkpoint(latest(run / "checkpoints"))[0]["menu"]
    revenue = json.loads((run / "report.json").read_text())["revenue"]["mean"]
    return menu, revenue


def _same(a: tuple[dict, float], b: tuple[dict, float], exact: bool) -> str:
    """'' when the menus agree (exactly, or within summation order), else what differs."""
    (ma, ra), (mb, rb) = a, b
    if exact:
        diff = [k for k in ma if not torch.equal(ma[k], mb[k])]
        return "" if not diff and ra == rb else f"differs in {diff or 'revenue'}"
    pa, pb = ma["prices"], mb["prices"]
    if not torch.allclose(pa, pb, rtol=0, atol=REL * float(pa.abs().max())):
        return f"prices differ by {float((pa - pb).abs().max()):.3g}"
    return "" if abs(ra - rb) <= REL * abs(ra) else f"revenue {ra} vs {rb}"


def _fail(text: str) -> str:
    return " | ".join(text.strip().splitlines()[-4:])


def _stage2_step(runs: Path) -> int:
    """The last Stage-2 step logged (metrics every stage2.log_every steps), -1 before."""
    steps = [-1]
    for path in runs.glob("*/metrics.jsonl"):
        for line in path.read_text().splitlines():
            if '"stage": 2' in line and line.endswith("}"):
                steps.append(json.loads(line).get("step", -1))
    return max(steps)


def _rank_pids(tag: str) -> dict[str, int]:
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if f"BUNDLEFLOW_FAULT_TAG={tag}".encode() in environ:
            rank = [e.split(b"=", 1)[1] for e in environ if e.startswith(b"RANK=")]
            if rank:
                found[rank[0].decode()] = int(proc.name)
    return found


def kill_trial(i: int, work: Path, env: dict, ref: tuple) -> str:
    rng = random.Random(i)
    runs = work / f"kill-{i}"
    env = {**env, "BUNDLEFLOW_FAULT_TAG": str(runs)}
    tail = [*ARGS, "--runs-dir", str(runs), *_sets(SETS)]
    out = subprocess.PIPE
    proc = subprocess.Popen(_cmd(2, tail), env=env, stdout=out, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)  # fmt: skip
    after = rng.randrange(0, 55)  # a random moment: past a random logged step, plus up to 0.5 s
    while not (runs.exists() and _stage2_step(runs) >= after):
        if proc.poll() is not None:
            return "failed before Stage 2: " + _fail(proc.stdout.read())
        time.sleep(0.02)
    time.sleep(rng.uniform(0, 0.5))
    rank = str(rng.randrange(2))
    pids = _rank_pids(str(runs))
    if rank not in pids:
        proc.wait()
        return f"rank {rank} already gone (run ended before the kill, exit {proc.returncode})"
    os.kill(pids[rank], signal.SIGKILL)
    proc.communicate(timeout=300)
    run = _run_dir(runs)
    ckpt = latest(run / "checkpoints")
    at = read_checkpoint(ckpt)[1]["step"] if ckpt else 0
    nproc = 1 if i % 2 == 0 else 2
    done = _resume(nproc, run, env)
    if done.returncode != 0:
        return f"resume on {nproc} failed (exit {done.returncode}): " + _fail(done.stderr)
    diff = _same(ref, _menu(run), exact=nproc == 2)
    where = f"rank {rank} killed (last checkpoint: step {at}), resumed on {nproc}"
    return f"{where}: {diff}" if diff else f"ok: {where}"


def disk_trial(i: int, work: Path, env: dict, ref: tuple) -> str:
    runs = work / f"disk-{i}"
    after = 10 * random.Random(i).randrange(1, 5)  # the disk fills after checkpoint 1..4
    tail = [*ARGS, "--runs-dir", str(runs), *_sets(SETS)]
    cmd = [sys.executable, "-c", ENOSPC_AFTER_CHECKPOINT, str(runs), str(after), *tail]
    full = subprocess.run(cmd, env=env, capture_output=True, text=True)
    err = full.stderr
    if full.returncode != 2 or "Traceback" in err or "free disk space" not in err:
        return f"full disk: exit {full.returncode}, not one clear error: " + _fail(err)
    run = _run_dir(runs)
    kept = read_checkpoint(latest(run / "checkpoints"))[1]["step"]  # verifies every checksum
    done = _resume(1, run, env)
    if done.returncode != 0:
        return "resume after the full disk failed: " + _fail(done.stderr)
    diff = _same(ref, _menu(run), exact=True)
    return f"kept step {kept}; {diff}" if diff else ""


def _damage(path: Path, rng: random.Random) -> None:
    data = bytearray(path.read_bytes())
    at = rng.randrange(len(data) // 2, len(data))  # past the header: the tensor bytes
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def cache_trial(i: int, work: Path, env: dict, refs: dict, kind: str) -> str:
    rng = random.Random(i)
    cache = Path(env["BUNDLEFLOW_CACHE"])
    if kind == "data":
        victims = sorted((cache / "data").glob("*.safetensors"))
        nproc, word = 1, "cached data set unusable"
    else:
        victims = sorted(f for f in (cache / "flows").rglob("*.safetensors"))
        nproc, word = (1 if kind == "flow-1" else 2), "flow"
    if not victims:
        return f"no {kind} cache entry to damage"
    victim = max(victims, key=lambda p: p.stat().st_size)
    _damage(victim, rng)
    runs = work / f"cache-{kind}-{i}"
    done = _train(nproc, runs, env)
    if done.returncode != 0:
        return f"{kind}: exit {done.returncode}: " + _fail(done.stderr)
    named = [ln for ln in done.stderr.splitlines() if "unusable" in ln and word in ln]
    if not named or victim.parent.name not in named[0] and victim.name not in named[0]:
        return f"{kind}: the damaged entry {victim} was not named: " + _fail(done.stderr)
    # two processes rebuild the flow with DDP (the reference's was trained on one): the
    # flows, and so the menus, differ by summation order only
    diff = _same(refs[nproc], _menu(_run_dir(runs)), exact=kind != "flow-2")
    return f"{kind}: {diff}" if diff else ""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=20, help="kill trials")
    p.add_argument("--disk-trials", type=int, default=5)
    p.add_argument("--cache-trials", type=int, default=3, help="per damaged cache kind")
    p.add_argument("--only", default="kill,disk,cache", help="also data, flow-1, flow-2")
    p.add_argument("--workdir", help="default: a new temporary directory")
    args = p.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bundleflow-faults-"))
    env = _env(work)
    started = time.monotonic()
    refs = {}
    for nproc in (1, 2):  # also fills the data and flow caches
        t0 = time.monotonic()
        done = _train(nproc, work / f"ref-{nproc}", env)
        if done.returncode != 0:
            sys.stderr.write(done.stderr[-3000:])
            return 1
        refs[nproc] = _menu(_run_dir(work / f"ref-{nproc}"))
        print(f"reference on {nproc} process(es): {time.monotonic() - t0:.1f} s", flush=True)
    counts: dict[str, list[int]] = {}
    trials = []
    only = args.only.split(",")
    if "kill" in only:
        trials += [("kill", i, lambda i: kill_trial(i, work, env, refs[2]))
                   for i in range(args.trials)]  # fmt: skip
    if "disk" in only:
        trials += [("disk", i, lambda i: disk_trial(i, work, env, refs[1]))
                   for i in range(args.disk_trials)]  # fmt: skip
    for kind in ("data", "flow-1", "flow-2"):  # --only cache, or one of them by name
        if "cache" in only or kind in only:
            trials += [(kind, i, lambda i, k=kind: cache_trial(i, work, env, refs, k))
                       for i in range(args.cache_trials)]  # fmt: skip
    for name, i, trial in trials:
        t0 = time.monotonic()
        problem = trial(i)
        note = problem[4:] if problem.startswith("ok: ") else ""
        problem = "" if note else problem
        ok, total = counts.setdefault(name, [0, 0])
        counts[name] = [ok + (not problem), total + 1]
        status = f"ok {note}".strip() if not problem else f"FAILED: {problem}"
        print(f"{name} {i}: {status} ({time.monotonic() - t0:.1f} s)", flush=True)
    summary = {k: f"{ok} of {total}" for k, (ok, total) in counts.items()}
    summary["minutes"] = round((time.monotonic() - started) / 60, 1)
    summary["workdir"] = str(work)
    print(json.dumps(summary))
    return 0 if all(ok == total for ok, total in counts.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
