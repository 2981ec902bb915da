"""End to end on a small generated file: `baselines`, the run report and its plots, `menu
query`, a brute-force re-evaluation of the saved frozen menu, presets, unit of money."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bundleflow.cli.app import main
from bundleflow.evaluation.mechanism import FrozenMechanism
from bundleflow.train.config import CONFIG_DIR, load_config
from bundleflow.valuations import io as data_io
from bundleflow.valuations.xor import xor_value_bruteforce
from tests.conftest import isolated_bundleflow_home, run_cli, single_torch_thread

M = 6
CPU_ARGS = ["--preset", "tiny", "--device", "cpu", "--no-progress"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    yield from single_torch_thread()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    yield from isolated_bundleflow_home(tmp_path_factory, "report")


@pytest.fixture(scope="module")
def data_file(env) -> Path:
    out = env / "small.safetensors"
    args = ["data", "generate", "--dist", "arbitrary", "--items", str(M), "--n", "400"]
    assert main([*args, "--seed", "1", "--out", str(out), "--no-progress"]) == 0
    return out


def _train(env: Path, data: Path, name: str) -> Path:
    runs = env / name
    assert main(["train", *CPU_ARGS, "--runs-dir", str(runs), "--data", str(data)]) == 0
    (run,) = [p for p in runs.iterdir() if p.is_dir()]
    return run


@pytest.fixture(scope="module")
def trained(env, data_file) -> Path:
    return _train(env, data_file, "runs")


def _json(capsys) -> dict:
    out = capsys.readouterr().out
    assert out.count("\n") == 1  # one object, nothing else on stdout
    return json.loads(out)


BASELINE_NAMES = {"grand_bundle", "uniform_item_price", "item_pricing", "bundle_size_pricing"}


def test_baselines_json_end_to_end(data_file, capsys):
    capsys.readouterr()
    assert main(["baselines", "--data", str(data_file), "--json"]) == 0
    report = _json(capsys)
    assert report["n_test"] == 20 and report["n_train"] == 360  # the file's 90/5/5 split
    mechs = report["mechanisms"]
    assert set(mechs) == BASELINE_NAMES | {"upper_bound"}
    for entry in mechs.values():
        assert entry["n_test"] == 20
        assert (
            entry["revenue"]["ci95"][0] <= entry["revenue"]["mean"] <= entry["revenue"]["ci95"][1]
        )
        assert 0 <= entry["fraction_of_max_value"] <= 1
    valuations = data_io.load_dataset(data_file).part("test")
    assert report["expected_max_value"] == pytest.approx(
        float(valuations[..., -1].amax(dim=1).double().mean())
    )


def test_baselines_missing_file_is_a_user_error(env, capsys):
    assert main(["baselines", "--data", str(env / "nope.safetensors")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_report_files_exist_and_plots_are_pngs(trained):
    for name in ("report.md", "report.json", "revenue.png", "menu.png"):
        assert (trained / name).is_file(), name
    for name in ("revenue.png", "menu.png"):
        assert (trained / name).read_bytes()[:8] == PNG_MAGIC
    report = json.loads((trained / "report.json").read_text())
    assert set(report["baselines"]) == BASELINE_NAMES | {"upper_bound"}
    assert report["best_baseline"] in BASELINE_NAMES
    assert "paired" in report["ratio_to_best_baseline"]["method"]
    assert sorted(report["plots"]) == ["menu.png", "revenue.png"]
    assert len(report["menu"]["purchases"]) == 32
    assert sum(report["menu"]["purchases"]) == round(report["buy_rate"] * report["n_test"])
    text = (trained / "report.md").read_text()
    assert "| bundle-size pricing |" in text and "![revenue.png](revenue.png)" in text


def test_evaluate_json_includes_every_baseline(trained, capsys):
    capsys.readouterr()
    assert main(["evaluate", "--run", str(trained), "--json"]) == 0
    report = _json(capsys)
    for name in BASELINE_NAMES:
        entry = report["baselines"][name]
        assert {"revenue", "fraction_of_max_value", "n_test"} <= set(entry)
    best = report["baselines"][report["best_baseline"]]["revenue"]["mean"]
    assert report["ratio_to_best_baseline"]["ratio"] == pytest.approx(
        report["revenue"]["mean"] / best
    )


def test_saved_menu_brute_force_matches_the_reported_revenue(trained, data_file):
    """Per valuation, per element: u_j = Σ_d α_jd v(S_jd) − p_j by a plain loop; the lowest
    index among the maxima, bought iff u ≥ 0. Same choices, so the same revenue, exactly."""
    report = json.loads((trained / "report.json").read_text())
    mech = FrozenMechanism.load(trained / "mechanism.safetensors")
    test = data_io.load_dataset(data_file).part("test")
    payments, choices = [], []
    for valuation in test:
        best_u, best_j = None, -1
        for j in range(mech.menu_size):
            u = -float(mech.prices[j])
            for d in range(mech.alpha.shape[1]):
                u += float(mech.alpha[j, d]) * xor_value_bruteforce(valuation, mech.bundles[j, d])
            if best_u is None or u > best_u:
                best_u, best_j = u, j
        bought = best_u >= 0  # individually rational: a negative best walks away
        choices.append(best_j if bought else -1)
        payments.append(mech.prices[best_j] if bought else torch.tensor(0.0))
    revenue = float(torch.stack(payments).double().mean())
    assert revenue == report["revenue"]["mean"]
    assert choices == mech.play(test)[0].tolist()
    assert report["ir_violations"] == 0


def test_menu_query_end_to_end(trained, data_file, capsys):
    capsys.readouterr()
    assert main(["menu", "query", str(trained), "--data", str(data_file), "--json"]) == 0
    out = _json(capsys)
    assert out["split"] == "test" and out["n"] == 20
    assert [row["index"] for row in out["valuations"]] == list(range(380, 400))
    report = json.loads((trained / "report.json").read_text())
    assert out["revenue"] == pytest.approx(report["revenue"]["mean"], rel=1e-6)
    for row in out["valuations"]:
        if row["element"] is None:
            assert row["payment"] == 0 and row["utility"] == 0
        else:
            element = out["elements"][str(row["element"])]
            assert row["payment"] == element["price"] and row["utility"] >= 0
            assert abs(sum(p["prob"] for p in element["lottery"]) - 1) < 0.01
    assert main(["menu", "query", str(trained), "--data", str(data_file), "--split", "all"]) == 0
    assert "400 valuations" in capsys.readouterr().out


# --------------------------------------------------------------------------- presets


def test_every_preset_loads_with_its_own_name():
    presets = sorted(CONFIG_DIR.glob("*.yaml"))
    assert {"paper-m50.yaml", "regions-m50.yaml", "default.yaml"} <= {p.name for p in presets}
    for path in presets:
        config = load_config(path.stem)
        assert config.name == path.stem
    for dist in ("arbitrary", "regions"):
        for values in ("upv", "npv"):
            for m in (50, 100, 150):
                data = load_config(f"{dist}-{values}-m{m}").data
                assert (data.kind, data.dist, data.values, data.n_items) == (
                    "cats",
                    dist,
                    values,
                    m,
                )
                assert data.mode == "fresh" and data.n_samples == 20000


# --------------------------------------------------------------------------- unit of money


def test_revenue_fraction_is_independent_of_the_unit_of_money(env, data_file):
    dataset = data_io.load_dataset(data_file)
    fractions = {}
    for factor in (0.01, 1.0, 100.0):
        scaled = dataset.valuations.clone()
        scaled[..., -1] *= factor
        path = env / f"scaled-{factor}.safetensors"
        data_io.save_dataset(path, scaled, {"split": dataset.split.to_dict()})
        run = _train(env, path, f"runs-scale-{factor}")
        report = json.loads((run / "report.json").read_text())
        fractions[factor] = report
    one = fractions[1.0]
    for factor in (0.01, 100.0):
        other = fractions[factor]
        assert other["fraction_of_max_value"] == pytest.approx(
            one["fraction_of_max_value"], rel=0.02
        )
        for name in BASELINE_NAMES:
            assert other["baselines"][name]["fraction_of_max_value"] == pytest.approx(
                one["baselines"][name]["fraction_of_max_value"], rel=1e-4
            )


# --------------------------------------------------------------------------- issue 25


def test_evaluate_prints_its_own_time_apart_from_the_training_wall_time(trained, capsys):
    """`evaluate RUN` printed the training run's wall time as if it were its own."""
    trained_for = json.loads((trained / "report.json").read_text())["wall_time"]
    capsys.readouterr()
    assert main(["evaluate", str(trained)]) == 0
    out = capsys.readouterr().out
    report = json.loads((trained / "report.json").read_text())
    assert report["wall_time"] == trained_for  # the training's, kept
    own = report["evaluation_time"]
    assert f"training wall time {trained_for:.1f} s on cpu" in out
    assert f"evaluation time {own:.1f} s on cpu (this command)" in out


class _Failed:
    def __init__(self, reason):
        self.eager_reason = reason


def test_a_failed_compile_is_a_finding_in_the_plan_and_the_report():
    from bundleflow.evaluation.report import format_summary, markdown
    from bundleflow.train.plan import COMPILER_FIX, resolve_plan

    plan = resolve_plan(load_config("tiny"), torch.device("cpu"))
    assert plan.after_run(_Failed(None), object()).eager is None  # nothing failed
    assert "eager" not in plan.after_run(_Failed(None)).to_dict()
    step = _Failed(
        "torch.compile failed (InductorError: InvalidCxxCompiler: No working C++ compiler\n\n"
        "Set TORCHDYNAMO_VERBOSE=1 for the internal stack trace"
    )
    after = plan.after_run(step, _Failed("compiled Adam failed (CalledProcessError: cc)"))
    eager = after.to_dict()["eager"]
    assert eager["status"] == "eager" and eager["fix"] == COMPILER_FIX
    assert "apt-get install gcc" in COMPILER_FIX and "python3-dev" in COMPILER_FIX
    assert "\n" not in eager["why"] and "TORCHDYNAMO_VERBOSE" not in eager["why"]
    assert "No working C++ compiler" in eager["why"] and "compiled Adam failed" in eager["why"]
    assert "ran eager" in after.describe() and "fallback" not in after.describe()
    report = {
        "revenue": {"n": 3, "mean": 1.0, "ci95": [0.5, 1.5]},
        "expected_max_value": 2.0, "fraction_of_max_value": 0.5, "ir_violations": 0,
        "elements_in_use": 1, "menu_size": 2, "buy_rate": 1.0, "negative_price_purchases": 0,
        "step_plan": after.to_dict(),
    }  # fmt: skip
    for text in (format_summary(report), markdown(report, [])):
        assert "eager: compile failed" in text and COMPILER_FIX in text


def test_a_missing_compiler_on_the_cpu_is_stated_in_the_report(env, data_file, tmp_path):
    """The compiled kernels on the CPU with no C++ compiler (CXX/CC point nowhere, empty
    inductor cache): the run finishes eager and run.json, report.json, report.md and the
    printed result say so, with the fix (before: one warning line in the log)."""
    runs = tmp_path / "runs"
    proc = run_cli(
        "train", *CPU_ARGS, "--runs-dir", str(runs), "--data", str(data_file),
        "--set", "stage2.kernels=compiled",
        env={
            "CXX": "/nonexistent/c++", "CC": "/nonexistent/cc", "OMP_NUM_THREADS": "1",
            "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
            "TRITON_CACHE_DIR": str(tmp_path / "triton"),
        },
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = [p for p in runs.iterdir() if p.is_dir()]
    plan = json.loads((run / "run.json").read_text())["step_plan"]
    assert plan["eager"]["status"] == "eager" and "compiler" in plan["eager"]["why"]
    assert json.loads((run / "report.json").read_text())["step_plan"]["eager"] == plan["eager"]
    for text in (proc.stdout, (run / "report.md").read_text()):
        assert "eager: compile failed" in text and "apt-get install gcc" in text
