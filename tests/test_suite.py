"""`bundleflow suite` end to end on one tiny known-optimum setting, the optimum rows of the
report and `compare`, and the evaluation-bug flag."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from bundleflow.cli.app import main
from bundleflow.cli.suite import suite_presets, summarise
from bundleflow.evaluation.report import ABOVE_OPTIMUM, comparison_table, optimum_record
from bundleflow.train.config import CONFIG_DIR, load_config
from bundleflow.valuations.known import make_setting

TINY_KNOWN = {
    "kind": "known",
    "setting": "unit-demand",
    "n_items": 2,
    "n_samples": 300,
    "known_val_samples": 100,
    "known_test_samples": 1000,
}


@pytest.fixture
def tiny_suite_preset(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("BUNDLEFLOW_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("BUNDLEFLOW_HOME", str(tmp_path / "home"))
    preset = yaml.safe_load((CONFIG_DIR / "tiny.yaml").read_text())
    preset.update(name="suite-tiny", data=TINY_KNOWN)
    path = tmp_path / "suite-tiny.yaml"
    path.write_text(yaml.safe_dump(preset))
    return path


def test_suite_end_to_end(tiny_suite_preset, tmp_path, capsys):
    runs = tmp_path / "runs"
    argv = ["suite", "--settings", str(tiny_suite_preset), "--seeds", "0", "--max-steps", "10",
            "--runs-dir", str(runs), "--device", "cpu", "--json"]  # fmt: skip
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    (run,) = out["runs"]
    optimum = make_setting("unit-demand").optimum.optimum
    assert run["setting"] == "tiny" and run["seed"] == 0 and out["ok"]
    assert run["optimum"] == pytest.approx(optimum)
    revenue = run["revenue"]["mean"]
    report = json.loads((Path(run["run"]) / "report.json").read_text())
    # paired: ÷ the optimal (Pavlov) menu's payments on the same test valuations
    assert run["optimum_pairing"] == "paired" and report["optimum"]["paired"]
    on_test = report["optimum"]["optimal_on_test"]["mean"]
    assert run["ratio_to_optimum"]["ratio"] == pytest.approx(revenue / on_test)
    lo, hi = run["ratio_to_optimum"]["ci95"]
    assert lo < run["ratio_to_optimum"]["ratio"] < hi
    assert run["best_posted_price"]["mean"] < optimum  # the lottery's room
    assert out["settings"][0]["ratio_to_optimum"] == pytest.approx(revenue / on_test)
    assert report["optimum"]["setting"] == "unit-demand"
    assert "ratio to optimum (paired)" in (Path(run["run"]) / "report.md").read_text()
    assert report["stage2"]["steps"] == 10
    # compare shows the optimum beside the run
    assert main(["compare", run["run"], "--json"]) == 0
    (record,) = json.loads(capsys.readouterr().out)["runs"]
    assert record["optimum"]["value"] == pytest.approx(optimum)
    assert main(["compare", run["run"]]) == 0
    assert "÷ optimum [95% CI]" in capsys.readouterr().out


def test_an_unknown_setting_is_a_user_error(capsys):
    assert main(["suite", "--settings", "no-such-setting", "--json"]) == 2
    assert "unknown preset" in capsys.readouterr().err


def test_every_suite_preset_names_a_known_setting():
    names = suite_presets()
    assert len(names) >= 8
    for name in names:
        config = load_config(name)
        assert config.data.kind == "known", name
        assert config.data.known_test_samples >= 100_000, name


def _report(mean: float, half: float) -> dict:
    return {
        "revenue": {"mean": mean, "ci95": [mean - half, mean + half], "n": 1000},
        "fraction_of_max_value": mean / 2,
        "expected_max_value": 2.0,
        "ratio_to_best_baseline": {"ratio": 1.0, "ci95": [0.99, 1.01]},
        "best_baseline": "item_pricing",
        "baselines": {
            "item_pricing": {
                "revenue": {"mean": 1.40, "ci95": [1.39, 1.41], "n": 1000},
                "fraction_of_max_value": 0.7,
            }
        },
    }


def test_above_the_optimum_beyond_its_ci_is_flagged():
    known = {"optimum": 1.45, "optimum_kind": "exact", "setting": "specialists"}
    inside = _report(1.452, 0.01)
    inside["optimum"] = optimum_record(inside, known)
    assert not inside["optimum"]["above_optimum"]
    assert ABOVE_OPTIMUM not in comparison_table(inside)
    assert "optimum (exact)" in comparison_table(inside)
    above = _report(1.47, 0.01)
    above["optimum"] = optimum_record(above, known)
    assert above["optimum"]["above_optimum"]
    assert above["optimum"]["ratio"]["ci95"] == pytest.approx([1.46 / 1.45, 1.48 / 1.45])
    assert f"ratio to optimum (unpaired) ({ABOVE_OPTIMUM})" in comparison_table(above)
    assert summarise(above)["flags"] == [f"menu {ABOVE_OPTIMUM}"]
    # a posted price above the optimum is an evaluation bug too
    low = _report(1.40, 0.01)
    low["optimum"] = optimum_record(low, {"optimum": 1.38})
    assert summarise(low)["flags"] == [
        f"menu {ABOVE_OPTIMUM}",
        f"item pricing {ABOVE_OPTIMUM}",
    ]
