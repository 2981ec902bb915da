"""Two real processes on the CPU (``ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2``).

What the acceptance asks: a short Stage-2 run on 2 processes ends where the same run on
1 process ends, for the same global batch and noise; files are written once; a signal to
one rank stops every rank at the same step with a checkpoint and exit 0.

Tolerance, and why. Every rank draws the step's whole batch and ε from the same seeded
generator and takes its part, so both layouts see the same draws; only summation order
differs (the [B]-vector all-reduces under ``shard``, the averaged half-batch gradients under
``replicate``), which changes results at float32
rounding (≈1e-7 relative). Adam turns rounding-level differences of near-zero gradients
(support points with α ≈ 0, whose log N(z0; μ, σ) with σ down to e^−34 depends on the last
bit of μ) into O(lr) differences of those points' M and w; they do not change what the
menu does. So the test compares what the mechanism does: the soft revenue at every
logged step and the validation revenue (1e-5 relative), the prices (1e-5 of their
scale) and the test revenue. ``replicate`` gets 1e-4 (see TOL).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bundleflow.system.distributed import Comm, shard_sizes
from bundleflow.train.checkpoint import read_checkpoint
from tests.conftest import run_cli

pytestmark = pytest.mark.skipif(
    shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None,
    reason="torchrun not installed beside this Python",
)

SETS = [  # on top of configs/tiny.yaml
    "menu.size=33",  # odd: the shards are 17 and 16 elements
    "menu.grand_bundle_element=true",  # element 0 lives on rank 0's shard only
    "stage2.steps=40",
    "stage2.eval_every=20",
    "stage2.checkpoint_every=20",
]
# replicate: each rank back-propagates half the batch through the faithful density
# gradient, whose two huge cancelling terms (≈1.1% artefact, see menu.py) are rounded
# differently than for the whole batch; Adam and the λ schedule amplify that over tens of
# steps (seen: 4.5e-4 by step 25, 12% after a λ reset at step 30). With the exact density
# gradient there is no cancellation and the layouts agree to ≈1e-6 over all 40 steps, so
# replicate is compared with the exact gradient on both sides, at 1e-4.
# Hard revenue is a step function of the parameters: with 20 validation/test bidders, one
# bidder moving between two elements of near-equal utility moves it by |Δprice|/20, so
# under replicate the hard revenues get 1%.
TOL = {"shard": 1e-5, "replicate": 1e-4}
HARD_TOL = {"shard": 1e-5, "replicate": 1e-2}
EXACT = "stage2.exact_density_grad=true"
ARGS = ["train", "--preset", "tiny", "--device", "cpu", "--no-progress"]


def _sets(items):
    return [a for item in items for a in ("--set", item)]


def _env(root: Path) -> dict:
    env = dict(os.environ)
    env.update(
        BUNDLEFLOW_CACHE=str(root / "cache"),
        ACCELERATE_USE_CPU="1",
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(Path(__file__).resolve().parents[1]),
    )
    return env


PROBE = Path(__file__).resolve().parent / "rank_exit_probe.py"
ABORTS = ("terminate called", "SIGABRT", "Signal 6", "exitcode: -6")


def _torchrun(nproc: int, runs: Path, extra: list[str], env: dict, **kw):
    """The ranks run ``bundleflow`` through tests/rank_exit_probe.py, which records the
    native threads alive at exit in ``runs.parent / "exit-<runs.name>"`` (see _no_gloo_left)."""
    exe = Path(sys.executable).parent / "torchrun"
    probe = runs.parent / f"exit-{runs.name}"
    probe.mkdir(parents=True, exist_ok=True)
    env = {**env, "BUNDLEFLOW_EXIT_PROBE": str(probe)}
    cmd = [str(exe), "--nproc_per_node", str(nproc), "--master_port", str(_free_port())]
    cmd += [str(PROBE), *ARGS, "--runs-dir", str(runs), *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def _no_gloo_left(runs: Path, ranks=("0", "1")) -> None:
    """Issue 28: no rank exits with the process group's threads still running (they outlived
    destroy_process_group when torch._dynamo was imported after the group; see
    bundleflow.system.distributed.before_process_group)."""
    probe = runs.parent / f"exit-{runs.name}"
    for rank in ranks:
        threads = (probe / f"rank{rank}.txt").read_text().split()
        assert not [t for t in threads if "gloo" in t], (rank, threads)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single(runs: Path, extra: list[str], env: dict) -> subprocess.CompletedProcess:
    return run_cli(*ARGS, "--runs-dir", str(runs), *extra, env=env)


def _only_run(runs: Path) -> Path:
    found = [p for p in runs.iterdir() if p.is_dir()]
    assert len(found) == 1, found
    return found[0]


def _records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single_runs(tmp_path_factory) -> tuple[dict[str, Path], dict]:
    """One process, with the faithful density gradient (for ``shard``) and the exact one
    (for ``replicate``, see TOL)."""
    root = tmp_path_factory.mktemp("dist")
    env = _env(root)
    runs = {}
    for name, extra in (("faithful", []), ("exact", [EXACT])):
        done = _single(root / f"runs-1-{name}", _sets([*SETS, *extra]), env)
        assert done.returncode == 0, done.stderr
        runs[name] = _only_run(root / f"runs-1-{name}")
    return runs, env


@pytest.mark.parametrize(
    ("parallel", "kernels"), [("shard", "plain"), ("replicate", "plain"), ("shard", "fused")]
)
def test_two_processes_end_where_one_process_ends(single_runs, parallel, kernels):
    """Against one process with the plain kernels (``fused``: the sharded step with the fused
    per-point work and its hand-written backward ends in the same place)."""
    runs_1, env = single_runs
    exact = [EXACT] if parallel == "replicate" else []
    one = runs_1["exact" if exact else "faithful"]
    runs = one.parent.parent / f"runs-2-{parallel}-{kernels}"
    items = [*SETS, *exact, f"stage2.parallel={parallel}", f"stage2.kernels={kernels}"]
    proc = _torchrun(2, runs, _sets(items), env, text=True)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    _no_gloo_left(runs)
    two = _only_run(runs)  # one run directory, written by the main process only

    rec1 = [r for r in _records(one) if r.get("stage") == 2]
    rec2 = [r for r in _records(two) if r.get("stage") == 2]
    assert [r["step"] for r in rec2] == [r["step"] for r in rec1]  # every line once
    for a, b in zip(rec1, rec2, strict=True):
        if "soft_revenue" in a:
            assert b["soft_revenue"] == pytest.approx(a["soft_revenue"], rel=TOL[parallel])
        if "val_revenue" in a:
            assert b["val_revenue"] == pytest.approx(a["val_revenue"], rel=HARD_TOL[parallel])

    c1 = read_checkpoint(sorted((one / "checkpoints").iterdir())[-1])
    c2 = read_checkpoint(sorted((two / "checkpoints").iterdir())[-1])
    assert c2[1]["extra"]["processes"] == 2 and c2[1]["extra"]["parallel"] == parallel
    p1, p2 = c1[0]["menu"]["prices"], c2[0]["menu"]["prices"]
    assert p2.shape == p1.shape == (33,)  # the whole menu, gathered from both shards
    if parallel == "shard":  # replicate: see HARD_TOL; prices of rarely chosen elements drift
        assert torch.allclose(p2, p1, rtol=0, atol=TOL[parallel] * float(p1.abs().max()))
    assert torch.equal(c2[0]["menu"]["std"], c1[0]["menu"]["std"])

    r1 = json.loads((one / "report.json").read_text())["revenue"]["mean"]
    r2 = json.loads((two / "report.json").read_text())["revenue"]["mean"]
    assert r2 == pytest.approx(r1, rel=HARD_TOL[parallel])
    log = (two / "train.log").read_text()
    assert log.count("stage 2 done") == 1  # the log is written by one process
    assert "[rank 1]" not in err  # rank 1 logged no events


def _ranks(cache: str, key: str = "BUNDLEFLOW_CACHE") -> dict[str, int]:
    """{RANK: pid} of the worker processes whose environment has ``key=cache``."""
    marker = f"{key}={cache}".encode()
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if marker in environ:
            rank = [e.split(b"=", 1)[1] for e in environ if e.startswith(b"RANK=")]
            if rank:
                found[rank[0].decode()] = int(proc.name)
    return found


def test_sigterm_to_one_rank_stops_every_rank_with_a_checkpoint(tmp_path):
    """SIGTERM to rank 1 only: the ranks agree at the next sync, rank 0 writes a checkpoint
    of that step, everyone exits 0, and the run resumes on ONE process from it."""
    env = _env(tmp_path)
    runs = tmp_path / "runs"
    items = [s for s in SETS if not s.startswith(("stage2.steps", "stage2.checkpoint_every"))]
    sets = _sets([*items, "stage2.steps=100000", "stage2.checkpoint_every=50"])
    proc = _torchrun(2, runs, sets, env, text=True, start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if runs.exists() and list(runs.glob("*/checkpoints/step-*/manifest.json")):
            break
        time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail("no checkpoint within 180 s")
    ranks = _ranks(env["BUNDLEFLOW_CACHE"])
    assert set(ranks) == {"0", "1"}, ranks
    os.kill(ranks["1"], signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, f"stdout:\n{out[-2000:]}\nstderr:\n{err[-4000:]}"
    _no_gloo_left(runs)
    run = _only_run(runs)
    last = read_checkpoint(sorted((run / "checkpoints").iterdir())[-1])[1]
    stopped = last["step"]
    assert stopped % 10 == 0  # the ranks agree every stage2.sync_every = 10 steps
    assert f"stopped by a signal at step {stopped}" in err
    resumed = _single(runs, ["--resume", str(run), "--max-steps", str(stopped + 10)], env)
    assert resumed.returncode == 0, resumed.stderr
    assert max(r["step"] for r in _records(run) if r.get("stage") == 2) == stopped + 10


def test_shards_cover_the_menu_once():
    assert shard_sizes(33, 2) == [17, 16] and shard_sizes(5, 3) == [2, 2, 1]
    ranges = [Comm(rank=r, world=3).shard(10) for r in range(3)]
    assert ranges == [(0, 4), (4, 7), (7, 10)]
    assert Comm().shard(7) == (0, 7) and not Comm().active


def test_accelerate_configs_are_valid_launch_configs():
    """configs/accelerate/*.yaml load as accelerate's own launch configs."""
    from accelerate.commands.config.config_args import load_config_from_file

    root = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
    seen = {}
    for path in sorted(root.glob("*.yaml")):
        cfg = load_config_from_file(str(path))
        seen[path.stem] = (str(cfg.distributed_type), cfg.num_processes, cfg.use_cpu)
    assert seen["single_gpu"] == ("DistributedType.NO", 1, False)
    assert seen["multi_gpu"] == ("DistributedType.MULTI_GPU", 2, False)
    assert seen["cpu_debug"] == ("DistributedType.NO", 1, True)


def test_stage2_precision_precedence(monkeypatch):
    """bundleflow flag > accelerate's launch setting > the measured default (bf16 on CUDA)."""
    from bundleflow.train.plan import stage2_precision

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert stage2_precision(None, cuda)[0] == "bf16"
    assert stage2_precision(None, cpu)[0] == "no"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    assert stage2_precision(None, cuda) == ("fp16", "accelerate (ACCELERATE_MIXED_PRECISION)")
    assert stage2_precision("no", cuda) == ("no", "bundleflow mixed_precision")


def test_bench_scaling_prints_process_counts_side_by_side():
    """scripts/bench_scaling.py --processes 1,2 runs the trainer's step on 1 and 2 processes
    (torchrun) and prints both with the speed-up over one process; on the CPU it says the
    figure is no scaling figure."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_scaling.py"
    sizes = ["--items", "6", "--menu", "16", "--batch", "8", "--steps", "2", "--warmup", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(script), "--processes", "1,2", *sizes],
        capture_output=True, text=True, env=env, timeout=240,
    )  # fmt: skip
    # the children's output (torchrun's and the ranks') is on stdout and stderr: show both
    assert done.returncode == 0, f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-2000:]}"
    rows = [json.loads(ln) for ln in done.stdout.splitlines() if ln.startswith("{")]
    assert [r["processes"] for r in rows] == [1, 2]
    assert [r["parallel"] for r in rows] == ["single", "shard"]
    table = [ln.split() for ln in done.stdout.splitlines() if ln.split()[:1] in (["1"], ["2"])]
    speedup = rows[1]["valuations_per_s"] / rows[0]["valuations_per_s"]
    assert table[0][4] == "1.00x" and table[1][4] == f"{speedup:.2f}x"
    assert "not a scaling figure" in done.stdout
    bad = subprocess.run(
        [sys.executable, str(script), "--processes", "two"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "--processes" in bad.stdout
