"""The trainer end to end on a tiny CATS problem (CPU, seconds): stages, run directory,
checkpoints, --flow-ckpt, devices, evaluate/menu show and --resume.

One module-scoped run (``trained``) is shared by the tests that only read it; tests that
write (resume) work on a copy.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from bundleflow import __version__
from bundleflow.cli.app import main
from bundleflow.errors import BundleflowError
from bundleflow.evaluation.evaluate import evaluate_mechanism, json_safe
from bundleflow.evaluation.mechanism import FrozenMechanism
from bundleflow.maths.flow import MixtureNoise, VelocityField
from bundleflow.maths.menu import Menu, lottery_utilities
from bundleflow.train.checkpoint import read_checkpoint, write_checkpoint
from bundleflow.train.config import load_config, parse_set
from bundleflow.train.menu_init import eval_noise
from bundleflow.train.stage1 import (
    flow_key,
    get_flow,
    load_flow,
    load_flow_ckpt,
    resolve_flow_ckpt,
    save_flow,
    train_stage1,
)
from bundleflow.valuations.io import load_dataset
from tests.conftest import (
    cli_error,
    isolated_bundleflow_home,
    run_cli,
    single_torch_thread,
    start_cli,
)

M = 6  # configs/tiny.yaml: m=6, 400 samples, J=32, 20+20 steps, checkpoints at 7, 14, 20
CPU_ARGS = ["--preset", "tiny", "--device", "cpu", "--no-progress"]


def _sets(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    yield from single_torch_thread()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """BUNDLEFLOW_HOME / BUNDLEFLOW_CACHE in a temporary directory for the whole module."""
    yield from isolated_bundleflow_home(tmp_path_factory, "bf")


def _only_run(runs: Path) -> Path:
    found = [p for p in runs.iterdir() if p.is_dir()]
    assert len(found) == 1, found
    return found[0]


@pytest.fixture(scope="module")
def trained(env) -> Path:
    """`bundleflow train` on the tiny problem: 20 Stage-1 and 20 Stage-2 steps."""
    runs = env / "runs-main"
    assert main(["train", *CPU_ARGS, "--runs-dir", str(runs)]) == 0
    return _only_run(runs)


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- independent answers


def _xor_value(valuation: torch.Tensor, bundle: list[int]) -> float:
    """v(S) = max{b_k : T_k ⊆ S}, 0 if none fits — one atom at a time."""
    best = 0.0
    for row in valuation.tolist():
        items, value = row[:-1], row[-1]
        if all(b >= 1 or t == 0 for t, b in zip(items, bundle, strict=True)):
            best = max(best, value)
    return best


def _brute_force_revenue(mech: FrozenMechanism, test: torch.Tensor) -> float:
    """Mean payment: the bidder takes the first best element if its utility is ≥ 0."""
    J, D, _ = mech.bundles.shape
    total = 0.0
    for valuation in test:
        best_u, best_j = -math.inf, None
        for j in range(J):
            u = sum(
                float(mech.alpha[j, d]) * _xor_value(valuation, mech.bundles[j, d].tolist())
                for d in range(D)
            ) - float(mech.prices[j])
            if u > best_u:
                best_u, best_j = u, j
        if best_u >= 0:
            total += float(mech.prices[best_j])
    return total / test.shape[0]


def _best_single_price(train: torch.Tensor) -> float:
    """argmax_P P·#{v ≥ P} over the observed grand-bundle values (highest among ties)."""
    values = sorted(train[..., -1].amax(dim=1).tolist())
    best_price, best_rev = 0.0, -1.0
    for p in values:
        rev = p * sum(v >= p for v in values)
        if rev > best_rev or (rev == best_rev and p > best_price):
            best_price, best_rev = p, rev
    return best_price


# --------------------------------------------------------------------------- Stage 1


def test_stage1_smoke_loss_is_finite_and_falls():
    config = load_config("tiny")
    records = []
    field, noise, summary = train_stage1(
        M,
        config.flow,
        config.stage1,
        torch.device("cpu"),
        metrics=lambda **r: records.append(r),
        show_progress=False,
    )
    assert summary["steps"] == 20
    assert math.isfinite(summary["loss_first"]) and math.isfinite(summary["loss_last"])
    assert summary["loss_last"] < summary["loss_first"]
    assert [r["step"] for r in records] == [5, 10, 15, 20]
    assert all(math.isfinite(r["loss"]) for r in records)
    assert not any(p.requires_grad for p in field.parameters())  # returned frozen, on the CPU
    assert noise.means.shape == (3, M)


def test_get_flow_caches_by_content(env):
    config = load_config("tiny", parse_set(["stage1.steps=3", "stage1.batch_size=32"]))
    cpu = torch.device("cpu")
    first, info = get_flow(M, config.flow, config.stage1, cpu, show_progress=False)
    assert info["cached"] is False and info["steps"] == 3
    assert Path(info["path"]).parent == env / "cache" / "flows"
    again, info2 = get_flow(M, config.flow, config.stage1, cpu, show_progress=False)
    assert info2["cached"] is True and info2["path"] == info["path"]
    for a, b in zip(first.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # the key is the content: another lr is another flow; log_every is not part of it
    other_lr = load_config(None, {"stage1": {"lr": 1e-3, "steps": 3}})
    more_logs = load_config(None, {"stage1": {"log_every": 1, "steps": 3}})
    base = load_config(None, {"stage1": {"steps": 3}})
    assert flow_key(M, base.flow, base.stage1) != flow_key(M, other_lr.flow, other_lr.stage1)
    assert flow_key(M, base.flow, base.stage1) == flow_key(M, more_logs.flow, more_logs.stage1)
    assert flow_key(M, base.flow, base.stage1) != flow_key(M + 1, base.flow, base.stage1)


# --------------------------------------------------------------------------- Stage 2 and the run


def test_stage2_smoke_soft_revenue_is_finite_and_rises(trained):
    soft = [
        r["soft_revenue"] for r in _records(trained) if r.get("stage") == 2 and "soft_revenue" in r
    ]
    assert len(soft) == 4  # steps 5, 10, 15, 20
    assert all(math.isfinite(x) for x in soft)
    # prices start near 0 (U[0, 1/750) normalised): 20 Adam steps must raise revenue a lot
    assert soft[-1] > 2 * soft[0] > 0
    val = [r for r in _records(trained) if "val_revenue" in r]
    assert [r["step"] for r in val] == [10, 20]
    assert all(math.isfinite(r["val_revenue"]) for r in val)


def test_run_directory_records_config_versions_and_data(trained, env):
    names = {p.name for p in trained.iterdir()}
    expected = {"config.yaml", "run.json", "metrics.jsonl", "mechanism.safetensors"}
    assert names >= expected | {"report.json", "report.md", "train.log", "flow.json", "best"}
    config = load_config(None, yaml.safe_load((trained / "config.yaml").read_text()))
    assert config == load_config("tiny", parse_set(["device=cpu"]))
    info = json.loads((trained / "run.json").read_text())
    assert info["package_version"] == __version__
    assert info["build"]["torch"] == torch.__version__
    assert info["build"]["cuda"] == torch.version.cuda
    data_file = Path(info["data"]["path"])
    assert data_file.parent == env / "cache" / "data"
    assert info["data"]["sha256"] == hashlib.sha256(data_file.read_bytes()).hexdigest()
    assert info["data"]["sizes"] == {"train": 360, "val": 20, "test": 20}
    assert info["device"] == "cpu"
    flow = json.loads((trained / "flow.json").read_text())
    assert Path(flow["path"]).parent == env / "cache" / "flows"
    # every checkpoint carries the config and the versions too
    _, manifest = read_checkpoint(trained / "best")
    assert manifest["config"]["menu"]["size"] == 32
    assert manifest["package_version"] == __version__
    assert manifest["build"]["torch"] == torch.__version__
    assert manifest["extra"]["data"]["sha256"] == info["data"]["sha256"]
    resumable = sorted((trained / "checkpoints").iterdir())[-1]
    assert read_checkpoint(resumable)[1]["extra"]["data"]["sha256"] == info["data"]["sha256"]


def test_report_matches_a_brute_force_evaluation(trained):
    report = json.loads((trained / "report.json").read_text())
    info = json.loads((trained / "run.json").read_text())
    dataset = load_dataset(info["data"]["path"], n_items=M)
    test, train = dataset.part("test"), dataset.part("train")
    mech = FrozenMechanism.load(trained / "mechanism.safetensors")
    assert report["n_test"] == 20 and report["revenue"]["n"] == 20
    assert report["revenue"]["mean"] == pytest.approx(_brute_force_revenue(mech, test), rel=1e-5)
    lo, hi = report["revenue"]["ci95"]
    assert lo <= report["revenue"]["mean"] <= hi
    upper = float(test[..., -1].amax(dim=1).double().mean())
    assert report["expected_max_value"] == pytest.approx(upper, rel=1e-9)
    assert report["fraction_of_max_value"] == pytest.approx(report["revenue"]["mean"] / upper)
    price = _best_single_price(train)
    assert report["grand_bundle"]["price"] == pytest.approx(price, rel=1e-6)
    grand = [price if v >= price else 0.0 for v in test[..., -1].amax(dim=1).tolist()]
    assert report["grand_bundle"]["revenue"]["mean"] == pytest.approx(sum(grand) / 20, rel=1e-6)
    assert report["ir_violations"] == 0
    assert report["menu_size"] == 32
    assert 0 <= report["elements_in_use"] <= 20
    assert report["stage2"]["steps"] == 20 and report["device"] == "cpu"


def test_best_checkpoint_reloads_to_the_same_utilities(trained):
    """best/ -> a fresh Menu -> lotteries with the recorded noise == the saved mechanism."""
    config = load_config(None, yaml.safe_load((trained / "config.yaml").read_text()))
    components, manifest = read_checkpoint(trained / "best")
    flow_path = Path(json.loads((trained / "flow.json").read_text())["path"])
    field, _, _ = load_flow(flow_path)
    menu = Menu(
        M,
        config.menu.size,
        config.menu.support,
        price_scale=5.0,
        generator=torch.Generator().manual_seed(999),  # not the training initialisation
    )
    assert not torch.equal(menu.prices, components["menu"]["prices"])
    menu.load_state_dict(components["menu"])
    eps = eval_noise(menu.means.shape, config.eval.seed)
    with torch.no_grad():
        lot = menu.lotteries(field, manifest["extra"]["mix_temp"], eps=eps)
    mech = FrozenMechanism.load(trained / "mechanism.safetensors")
    assert mech.meta["best_step"] == manifest["step"]
    assert torch.equal(mech.eps, eps)
    assert torch.equal(mech.bundles, lot.bundles.to(torch.uint8))
    assert torch.equal(mech.alpha, lot.alpha)
    assert torch.equal(mech.prices, menu.prices.detach() * mech.money_scale)
    info = json.loads((trained / "run.json").read_text())
    test = load_dataset(info["data"]["path"], n_items=M).part("test")
    from_menu = lottery_utilities(
        lot.bundles, lot.alpha, menu.prices.detach() * mech.money_scale, test
    )
    assert torch.equal(mech.utilities(test), from_menu)


def test_menu_round_trip_through_a_checkpoint_gives_identical_utilities(tmp_path):
    gen = torch.Generator().manual_seed(3)
    field = VelocityField(M, hidden=16).requires_grad_(False)
    saved = Menu(M, 5, 3, price_scale=2.0, generator=gen)
    write_checkpoint(tmp_path / "c", {"menu": dict(saved.state_dict())}, step=1)
    components, _ = read_checkpoint(tmp_path / "c")
    loaded = Menu(M, 5, 3, generator=torch.Generator().manual_seed(4))
    loaded.load_state_dict(components["menu"])
    assert torch.equal(loaded.std, saved.std)  # σ is persistent state, not re-drawn
    eps = saved.draw_noise(torch.Generator().manual_seed(5))
    values = torch.zeros(7, 2, M + 1)
    values[:, 0, :M] = (torch.rand(7, M, generator=gen) < 0.5).float()
    values[:, 0, M] = torch.rand(7, generator=gen) * 3
    with torch.no_grad():
        a = saved.utilities(saved.lotteries(field, 0.5, eps=eps), values)
        b = loaded.utilities(loaded.lotteries(field, 0.5, eps=eps), values)
    assert torch.equal(a, b)


def test_final_checkpoint_on_a_checkpoint_step(env):
    """A run whose last step is a multiple of stage2.checkpoint_every must not crash."""
    runs = env / "runs-ckpt-step"
    items = ["stage2.steps=10", "stage2.checkpoint_every=5"]
    assert main(["train", *CPU_ARGS, "--runs-dir", str(runs), *_sets(items)]) == 0
    run = _only_run(runs)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step-000000005",
        "step-000000010",
    ]


# --------------------------------------------------------------------------- evaluate, menu show


def _two_item_mechanism() -> FrozenMechanism:
    """Element 0: item 0 for 3; element 1: both items for 5 (deterministic lotteries)."""
    return FrozenMechanism(
        bundles=torch.tensor([[[1, 0]], [[1, 1]]], dtype=torch.uint8),
        alpha=torch.ones(2, 1),
        prices=torch.tensor([3.0, 5.0]),
        eps=torch.zeros(2, 1, 2),
        mix_temp=1.0,
    )


def _xor(*atoms: tuple[tuple[int, int], float]) -> torch.Tensor:
    out = torch.zeros(2, 3)
    for k, (items, value) in enumerate(atoms):
        out[k, :2] = torch.tensor(items, dtype=torch.float32)
        out[k, 2] = value
    return out


def test_evaluate_mechanism_on_a_hand_computed_instance():
    test = torch.stack(
        [
            _xor(((1, 0), 4.0), ((1, 1), 6.0)),  # u = (1, 1): tie -> element 0, pays 3
            _xor(((0, 1), 10.0)),  # u = (-3, 5): pays 5
            _xor(((1, 0), 2.0)),  # u = (-1, -3): walks away
            _xor(((1, 1), 5.0)),  # u = (-3, 0): buys at zero utility, pays 5
        ]
    )
    report = evaluate_mechanism(_two_item_mechanism(), test, test, batch_size=3)
    assert report["revenue"]["mean"] == pytest.approx(13 / 4)
    # payments 3, 5, 0, 5: sample std sqrt(16.75 / 3)
    half = 1.959963984540054 * math.sqrt(16.75 / 3) / 2
    assert report["revenue"]["ci95"] == pytest.approx([13 / 4 - half, 13 / 4 + half])
    assert report["expected_max_value"] == pytest.approx(23 / 4)  # max values 6, 10, 2, 5
    assert report["fraction_of_max_value"] == pytest.approx(13 / 23)
    # grand bundle on values {10, 6, 5, 2}: k·v_(k) = 10, 12, 15, 8 -> price 5, sells 3 of 4
    assert report["grand_bundle"]["price"] == 5.0
    assert report["grand_bundle"]["revenue"]["mean"] == pytest.approx(15 / 4)
    assert report["ratio_to_grand_bundle"] == pytest.approx(13 / 15)
    assert report["buy_rate"] == 0.75 and report["elements_in_use"] == 2
    assert report["ir_violations"] == 0 and report["negative_price_purchases"] == 0
    assert report["n_test"] == 4


def test_report_json_has_no_nan_or_infinity():
    """One test valuation (no CI) and a grand bundle that sells nothing (ratio 1/0)."""
    test = _xor(((0, 1), 10.0))[None]
    train = _xor(((1, 1), 100.0))[None]
    report = evaluate_mechanism(_two_item_mechanism(), test, train)
    assert report["revenue"]["mean"] == 5.0 and report["grand_bundle"]["revenue"]["mean"] == 0
    assert math.isinf(report["ratio_to_grand_bundle"])
    safe = json_safe(report)
    text = json.dumps(safe, allow_nan=False)  # strict JSON
    assert json.loads(text)["ratio_to_grand_bundle"] is None
    assert safe["revenue"]["ci95"] == [None, None] and safe["revenue"]["mean"] == 5.0


def test_evaluate_json_prints_one_object(trained, capsys):
    capsys.readouterr()
    assert main(["evaluate", "--run", str(trained), "--json"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    result = json.loads(out)
    saved = json.loads((trained / "report.json").read_text())
    assert result["n_test"] == 20
    assert result["revenue"]["mean"] == pytest.approx(saved["revenue"]["mean"], rel=1e-12)
    assert result["fraction_of_max_value"] == pytest.approx(saved["fraction_of_max_value"])
    assert result["grand_bundle"]["revenue"]["mean"] == saved["grand_bundle"]["revenue"]["mean"]
    assert "fraction_of_max_value" in result["grand_bundle"]


def test_menu_show_json(trained, capsys):
    capsys.readouterr()
    assert main(["menu", "show", str(trained), "--json"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    shown = json.loads(out)
    mech = FrozenMechanism.load(trained / "mechanism.safetensors")
    assert (shown["menu_size"], shown["support"], shown["n_items"]) == (32, 8, M)
    assert len(shown["elements"]) == 32
    for element in shown["elements"]:
        j = element["element"]
        assert element["price"] == pytest.approx(float(mech.prices[j]))
        probs = [p["prob"] for p in element["lottery"]]
        assert 1 - 8e-3 <= sum(probs) <= 1 + 1e-5  # points below 1e-3 are not listed
        for point in element["lottery"]:
            d = next(
                d
                for d in range(8)
                if float(mech.alpha[j, d]) == point["prob"]
                and [i for i in range(M) if mech.bundles[j, d, i]] == point["bundle"]
            )
            assert d is not None
    assert main(["menu", "show", str(trained)]) == 0
    assert "frozen menu: 32 elements" in capsys.readouterr().out


# --------------------------------------------------------------------------- --flow-ckpt


@pytest.fixture
def flow_ckpt(tmp_path):
    """A flow checkpoint directory (no training needed to test where it is found)."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    field = VelocityField(M, hidden=8)
    noise = MixtureNoise(M, generator=gen)
    path = save_flow(tmp_path / "somewhere" / "flowdir", field, noise, {"steps": 0, "key": "k"})
    return path, field


def _same_weights(a: VelocityField, b: VelocityField) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_flow_ckpt_absolute_path(flow_ckpt, monkeypatch):
    path, field = flow_ckpt
    monkeypatch.delenv("BUNDLEFLOW_HOME", raising=False)
    assert resolve_flow_ckpt(str(path)) == path
    loaded, info = load_flow_ckpt(str(path), M)
    assert _same_weights(loaded, field) and info["key"] == "k"


def test_flow_ckpt_relative_to_cwd_wins_over_home(flow_ckpt, tmp_path, monkeypatch):
    path, _ = flow_ckpt
    home = tmp_path / "home"
    shutil.copytree(path, home / "somewhere" / "flowdir")
    monkeypatch.setenv("BUNDLEFLOW_HOME", str(home))
    monkeypatch.chdir(tmp_path)
    assert resolve_flow_ckpt("somewhere/flowdir") == tmp_path / "somewhere" / "flowdir"


def test_flow_ckpt_relative_to_bundleflow_home(flow_ckpt, tmp_path, monkeypatch):
    path, _ = flow_ckpt
    home = tmp_path / "home"
    shutil.copytree(path, home / "flows" / "mine")
    shutil.copytree(path, home / "runs" / "r1")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("BUNDLEFLOW_HOME", str(home))
    assert resolve_flow_ckpt("flows/mine") == home / "flows" / "mine"
    assert resolve_flow_ckpt("r1") == home / "runs" / "r1"  # a run name under $HOME/runs


def test_flow_ckpt_run_directory_follows_flow_json(flow_ckpt, tmp_path, monkeypatch):
    path, field = flow_ckpt
    run = tmp_path / "run"
    run.mkdir()
    (run / "flow.json").write_text(json.dumps({"path": str(path), "key": "k"}))
    monkeypatch.delenv("BUNDLEFLOW_HOME", raising=False)
    assert resolve_flow_ckpt(str(run)) == path
    assert _same_weights(load_flow_ckpt(str(run), M)[0], field)


def test_flow_ckpt_reference_pth(tmp_path, monkeypatch):
    torch.manual_seed(1)
    reference = VelocityField(M, hidden=12, hidden2=10)
    torch.save(reference.state_dict(), tmp_path / "flow_m6.pth")  # the public code's layout
    monkeypatch.chdir(tmp_path)
    assert resolve_flow_ckpt("flow_m6.pth") == tmp_path / "flow_m6.pth"
    loaded, info = load_flow_ckpt("flow_m6.pth", M)
    assert _same_weights(loaded, reference)
    assert (loaded.fc1.out_features, loaded.fc2.out_features) == (12, 10)
    with pytest.raises(BundleflowError, match="m=6"):
        load_flow_ckpt("flow_m6.pth", M + 1)
    run = tmp_path / "run"  # a run that used this .pth: its flow.json points at the file
    run.mkdir()
    (run / "flow.json").write_text(json.dumps({"path": str(tmp_path / "flow_m6.pth")}))
    assert resolve_flow_ckpt("run") == tmp_path / "flow_m6.pth"


def test_flow_ckpt_for_another_m_is_refused(flow_ckpt):
    path, _ = flow_ckpt
    with pytest.raises(BundleflowError, match="m=6.*m=7"):
        load_flow_ckpt(str(path), M + 1)


def test_flow_ckpt_miss_lists_every_place_tried(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("BUNDLEFLOW_HOME", str(home))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BundleflowError) as exc:
        resolve_flow_ckpt("flows/missing")
    message = str(exc.value)
    for place in (tmp_path / "flows/missing", home / "flows/missing", home / "runs/flows/missing"):
        assert str(place) in message
    monkeypatch.delenv("BUNDLEFLOW_HOME")
    with pytest.raises(BundleflowError, match="BUNDLEFLOW_HOME is not set"):
        resolve_flow_ckpt("flows/missing")


def test_train_stage2_with_flow_ckpt_of_a_run(trained, env, capsys):
    runs = env / "runs-stage2"
    items = ["stage2.steps=3", "stage2.eval_every=3"]
    argv = ["train-stage2", *CPU_ARGS, "--runs-dir", str(runs), "--flow-ckpt", str(trained)]
    assert main([*argv, *_sets(items)]) == 0
    run = _only_run(runs)
    assert (
        json.loads((run / "flow.json").read_text())["path"]
        == json.loads((trained / "flow.json").read_text())["path"]
    )
    assert not any(r.get("stage") == 1 for r in _records(run))  # no Stage-1 training
    capsys.readouterr()
    missing = ["train-stage2", *CPU_ARGS, "--runs-dir", str(runs), "--flow-ckpt", "nope"]
    assert main([*missing, *_sets(items)]) == 2
    assert "'nope' not found; tried:" in capsys.readouterr().err


# --------------------------------------------------------------------------- devices


def test_device_cuda_without_cuda_exits_2_naming_the_build(tmp_path):
    """CUDA_VISIBLE_DEVICES='' makes this hold on GPU machines too."""
    env = {
        "CUDA_VISIBLE_DEVICES": "",
        "BUNDLEFLOW_HOME": str(tmp_path / "home"),
        "BUNDLEFLOW_CACHE": str(tmp_path / "cache"),
    }
    out = run_cli("train", "--device", "cuda", "--no-progress", cwd=tmp_path, env=env)
    lines = cli_error(out, lines=2)  # what is wrong, then the fix
    assert lines[0].startswith("bundleflow: error: --device cuda: ")
    assert lines[1].startswith("fix: ") and "--device cpu" in lines[1]
    assert all(len(line) <= 200 for line in lines), out.stderr
    if torch.version.cuda is None:  # this CPU machine: the build is named
        assert f"torch {torch.__version__}" in lines[0] and "CPU-only" in lines[0]
    assert not (tmp_path / "home").exists()  # refused before any run directory exists


# --------------------------------------------------------------------------- resume


def test_resume_continues_from_the_last_checkpoint(trained, env):
    """20 steps + resume to 30 == 30 steps in one go (same menu, bit for bit)."""
    copy = env / "resumed" / trained.name
    shutil.copytree(trained, copy)
    assert main(["train", "--resume", str(copy), "--max-steps", "30", "--no-progress"]) == 0
    records = [r for r in _records(copy) if r.get("stage") == 2]
    steps = [r["step"] for r in records if "soft_revenue" in r]
    assert steps == [5, 10, 15, 20, 25, 30]  # continued, not restarted
    assert [r["step"] for r in records if "val_revenue" in r] == [10, 20, 30]
    report = json.loads((copy / "report.json").read_text())
    assert report["stage2"]["steps"] == 30
    assert sorted(p.name for p in (copy / "checkpoints").iterdir())[-1] == "step-000000030"

    runs = env / "runs-30"
    assert main(["train", *CPU_ARGS, "--runs-dir", str(runs), *_sets(["stage2.steps=30"])]) == 0
    straight = _only_run(runs)
    a = FrozenMechanism.load(copy / "mechanism.safetensors")
    b = FrozenMechanism.load(straight / "mechanism.safetensors")
    assert a.meta["best_step"] == b.meta["best_step"]
    assert torch.equal(a.prices, b.prices) and torch.equal(a.alpha, b.alpha)
    soft_straight = [r["soft_revenue"] for r in _records(straight) if "soft_revenue" in r]
    assert [r["soft_revenue"] for r in records if "soft_revenue" in r] == soft_straight


def test_resume_keeps_the_flow_the_run_was_trained_with(env, tmp_path):
    """A run started with --flow-ckpt resumes with that flow, not the config's cached one."""
    torch.manual_seed(2)
    torch.save(VelocityField(M, hidden=8).state_dict(), tmp_path / "ref.pth")
    runs = env / "runs-pth"
    items = ["stage2.steps=10", "stage2.eval_every=5"]
    argv = ["train-stage2", *CPU_ARGS, "--runs-dir", str(runs), "--flow-ckpt"]
    assert main([*argv, str(tmp_path / "ref.pth"), *_sets(items)]) == 0
    run = _only_run(runs)
    assert main(["train", "--resume", str(run), "--max-steps", "14", "--no-progress"]) == 0
    assert json.loads((run / "flow.json").read_text())["path"] == str(tmp_path / "ref.pth")
    assert json.loads((run / "run.json").read_text())["flow"]["path"] == str(tmp_path / "ref.pth")
    assert not any(r.get("stage") == 1 for r in _records(run))
    assert json.loads((run / "report.json").read_text())["stage2"]["steps"] == 14


def test_fused_kernels_train_the_same_menu_bit_for_bit(trained, env):
    """stage2.kernels=fused on the CPU: the plain run's soft revenues and mechanism exactly
    (same formulas in the same order, a hand-written backward)."""
    runs = env / "runs-fused"
    argv = ["train", *CPU_ARGS, "--runs-dir", str(runs), *_sets(["stage2.kernels=fused"])]
    assert main(argv) == 0
    fused = _only_run(runs)
    assert json.loads((fused / "run.json").read_text())["step_plan"]["kernels"]["value"] == "fused"
    assert (
        json.loads((trained / "run.json").read_text())["step_plan"]["kernels"]["value"] == "plain"
    )
    soft = [
        [r["soft_revenue"] for r in _records(d) if "soft_revenue" in r] for d in (trained, fused)
    ]
    assert soft[0] == soft[1] and len(soft[0]) == 4
    a = FrozenMechanism.load(trained / "mechanism.safetensors")
    b = FrozenMechanism.load(fused / "mechanism.safetensors")
    assert torch.equal(a.prices, b.prices) and torch.equal(a.alpha, b.alpha)
    assert torch.equal(a.bundles, b.bundles)


def test_graph_step_mode_needs_cuda(env, capsys):
    """stage2.step_mode=graph off CUDA: exit 2 naming the key and the reason, no run left."""
    runs = env / "runs-graph-cpu"
    code = main(["train", *CPU_ARGS, "--runs-dir", str(runs), "--set", "stage2.step_mode=graph"])
    assert code == 2
    err = capsys.readouterr().err
    assert "stage2.step_mode" in err and "not CUDA" in err
    assert not runs.exists() or not any(runs.iterdir())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_graph_step_mode_trains_and_resumes_on_cuda(env):
    """The captured step trains (finite, rising soft revenue), checkpoints and resumes."""
    runs = env / "runs-graph"
    sets = _sets(["stage2.step_mode=graph", "stage2.steps=40", "stage2.checkpoint_every=10"])
    assert main(["train", "--preset", "tiny", "--device", "cuda", "--no-progress",
                 "--runs-dir", str(runs), *sets]) == 0  # fmt: skip
    run = _only_run(runs)
    soft = [r["soft_revenue"] for r in _records(run) if "soft_revenue" in r]
    assert all(math.isfinite(x) for x in soft) and soft[-1] > soft[0]
    # As if killed after the step-30 checkpoint: the last one and the results are gone.
    shutil.rmtree(run / "checkpoints" / "step-000000040")
    (run / "mechanism.safetensors").unlink()
    assert main(["train", "--device", "cuda", "--no-progress", "--resume", str(run),
                 *sets]) == 0  # fmt: skip
    assert "(step 30)" in (run / "train.log").read_text()
    steps = [r["step"] for r in _records(run) if "soft_revenue" in r]
    assert steps[-1] == 40
    rng = read_checkpoint(sorted((run / "checkpoints").iterdir())[-1])[0]["rng"]
    assert "cuda" in rng


def _start_and_wait_for_checkpoint(runs: Path, sets: list[str]) -> subprocess.Popen:
    """A CLI training run in a subprocess, returned once Stage 2 has written a checkpoint."""
    import time

    proc = start_cli("train", *CPU_ARGS, "--runs-dir", str(runs), *sets)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if runs.exists() and list(runs.glob("*/checkpoints/step-*/manifest.json")):
            return proc
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("no checkpoint within 120 s")


def test_sigterm_finishes_the_step_checkpoints_and_exits_0(env):
    """A terminated job (pre-emption, `docker stop`) finishes its step, writes a checkpoint
    of exactly that step, exits 0, and `--resume` continues from it."""
    import re
    import signal

    runs = env / "runs-sigterm"
    sets = _sets(["stage2.steps=100000"])
    proc = _start_and_wait_for_checkpoint(runs, sets)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    stopped = int(re.search(r"stopped by a signal at step (\d+)", err).group(1))
    run = _only_run(runs)
    last = sorted((run / "checkpoints").iterdir())[-1]
    assert read_checkpoint(last)[1]["step"] == stopped
    assert not (run / "mechanism.safetensors").exists()
    resumed = [*CPU_ARGS, "--resume", str(run), *sets, "--max-steps", str(stopped + 10)]
    assert main(["train", *resumed]) == 0
    steps = [r["step"] for r in _records(run) if r.get("stage") == 2]
    assert max(steps) == stopped + 10
    assert (run / "mechanism.safetensors").exists()


def test_sigkilled_run_resumes_to_the_same_menu_bit_for_bit(env):
    """SIGKILL after a checkpoint (no handler runs), then --resume: the same frozen menu and
    the same report as an uninterrupted run, bit for bit on the CPU. Batches and noise are
    drawn from one seeded generator whose state every checkpoint holds, so the resumed run
    draws what the lost steps would have."""
    import signal

    sets = _sets(["stage2.steps=100000", "stage2.checkpoint_every=20"])
    total = ["--max-steps", "200"]
    killed_runs, straight_runs = env / "runs-sigkill", env / "runs-straight"
    proc = _start_and_wait_for_checkpoint(killed_runs, sets)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    killed = _only_run(killed_runs)
    assert not (killed / "mechanism.safetensors").exists()
    assert main(["train", *CPU_ARGS, "--resume", str(killed), *sets, *total]) == 0
    assert main(["train", *CPU_ARGS, "--runs-dir", str(straight_runs), *sets, *total]) == 0
    straight = _only_run(straight_runs)
    a = FrozenMechanism.load(killed / "mechanism.safetensors")
    b = FrozenMechanism.load(straight / "mechanism.safetensors")
    assert a.meta["best_step"] == b.meta["best_step"]
    for name in ("bundles", "alpha", "prices"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    ra = json.loads((killed / "report.json").read_text())["revenue"]
    rb = json.loads((straight / "report.json").read_text())["revenue"]
    assert ra == rb


def test_bad_data_file_leaves_no_run_directory(env, tmp_path, capsys):
    """A malformed --data file: exit 2, one line naming the file, and no half-written run."""
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a tensor file")
    runs = env / "runs-bad-data"
    code = main(["train", *CPU_ARGS, "--runs-dir", str(runs), "--data", str(bad)])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert any(str(bad) in line for line in err) and not any("Traceback" in x for x in err)
    assert not runs.exists() or not any(runs.iterdir())


def test_non_finite_parameters_stop_the_run_and_keep_the_last_good_checkpoint(
    env, monkeypatch, capsys
):
    """A NaN that appears after step 12 (a checkpoint was written at step 7): the run stops
    at the next check with exit 2 and one line naming the window of steps and the last good
    checkpoint; no checkpoint of the diverged state is written and step 7 still loads."""
    import bundleflow.train.stage2 as stage2

    real_step = stage2.Stage2Trainer.step

    def poisoned(trainer):
        loss = real_step(trainer)
        if trainer.state.step == 12:
            with torch.no_grad():
                trainer.menu.prices[3] = float("nan")
        return loss

    monkeypatch.setattr(stage2.Stage2Trainer, "step", poisoned)
    runs = env / "runs-nan"
    code = main(["train", *CPU_ARGS, "--runs-dir", str(runs), *_sets(["stage2.steps=40"])])
    assert code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1
    assert "non-finite between step 10 and step" in err[0] and "step-000000007" in err[0]
    run = _only_run(runs)
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["step-000000007"]
    components, manifest = read_checkpoint(run / "checkpoints" / names[0])
    assert manifest["step"] == 7 and torch.isfinite(components["menu"]["prices"]).all()


def test_stage1_cosine_schedule_is_its_own_cache_entry_and_decays_the_lr(monkeypatch):
    """`stage1.lr_schedule=cosine` trains with a learning rate that reaches 0 at the last
    step and gets its own cache key; `constant` keeps the key flows had before the option
    (the paper-m50 flow cached on the GPU machines was 8691c6eff4d4394c09fc)."""
    from bundleflow.train.stage1 import flow_key, train_stage1

    paper = load_config("paper-m50")
    assert flow_key(50, paper.flow, paper.stage1) == "8691c6eff4d4394c09fc"
    cosine = load_config("paper-m50", parse_set(["stage1.lr_schedule=cosine"]))
    assert flow_key(50, cosine.flow, cosine.stage1) != flow_key(50, paper.flow, paper.stage1)

    seen = []
    real_step = torch.optim.Adam.step

    def recording_step(self, *args, **kw):
        seen.append(self.param_groups[0]["lr"])
        return real_step(self, *args, **kw)

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    cfg = load_config("default", parse_set(["stage1.steps=10", "stage1.lr_schedule=cosine"]))
    train_stage1(M, cfg.flow, cfg.stage1, torch.device("cpu"), show_progress=False)
    assert seen[0] == pytest.approx(cfg.stage1.lr)
    assert seen == sorted(seen, reverse=True) and seen[-1] < 0.03 * cfg.stage1.lr


# --------------------------------------------------------------------------- one step


def test_the_trainer_runs_the_one_step_with_its_seeded_draws(trained):
    """`bundleflow train` and the bare trainer's step (Stage2Trainer without a run, what
    profile and the scripts run) end with the same menu, bit for bit: one step
    implementation, its draws from one generator seeded by stage2.seed."""
    from bundleflow.train.data import load_run_data
    from bundleflow.train.plan import resolve_plan
    from bundleflow.train.stage2 import Stage2Trainer

    cfg = load_config(str(trained / "config.yaml"))
    cpu = torch.device("cpu")
    data = load_run_data(cfg.data, cpu)
    flow, _ = load_flow_ckpt(str(trained), data.n_items)
    plan = resolve_plan(cfg, cpu)
    assert plan.step_mode.value == "eager" and plan.parallel.value == "single"
    trainer = Stage2Trainer(cfg, flow, data, plan)
    for _ in range(cfg.stage2.steps):
        trainer.step()
    final = sorted((trained / "checkpoints").iterdir())[-1]
    saved, manifest = read_checkpoint(final)
    assert manifest["step"] == cfg.stage2.steps
    for name, value in trainer.menu.state_dict().items():
        assert torch.equal(value, saved["menu"][name]), name
    assert torch.equal(trainer.generator.get_state(), saved["rng"]["generator"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_graph_and_eager_steps_agree_over_1000_steps(env):
    """On CUDA the captured step and the eager step from one seed draw the same numbers (the
    graph advances the default CUDA generator as eager calls do) and stay together to
    float rounding over 1,000 steps (fp32 flow network, plain kernels: no compiler)."""
    from bundleflow.train.data import load_run_data
    from bundleflow.train.plan import resolve_plan
    from bundleflow.train.stage2 import Stage2Trainer

    cuda = torch.device("cuda")
    sets = ["mixed_precision=no", "stage2.kernels=plain", "stage2.steps=1000", "menu.size=256"]
    menus, losses = {}, {}
    for mode in ("eager", "graph"):
        cfg = load_config("tiny", parse_set([*sets, f"stage2.step_mode={mode}"]))
        data = load_run_data(cfg.data, cuda)
        torch.manual_seed(0)
        flow = VelocityField(data.n_items, 16, 16)
        trainer = Stage2Trainer(cfg, flow, data, resolve_plan(cfg, cuda))
        assert trainer.step_fn.mode == mode
        losses[mode] = torch.stack([trainer.step() for _ in range(1000)]).cpu()
        menus[mode] = {k: v.detach().cpu() for k, v in trainer.menu.state_dict().items()}
    assert torch.allclose(losses["graph"], losses["eager"], rtol=1e-4, atol=1e-6)
    for name in ("prices", "logits"):
        assert torch.allclose(menus["graph"][name], menus["eager"][name], rtol=1e-3, atol=1e-5)
