"""`bundleflow compare`: three tiny runs that differ only by seeds form one group whose mean
and spread match the reports; --json, --csv and --plot; unfinished runs; user errors."""

from __future__ import annotations

import csv
import io
import json
import shutil
import statistics
from pathlib import Path

import pytest
import yaml

from bundleflow.cli.app import main
from tests.conftest import cli_error, isolated_bundleflow_home, run_cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SEED_SETS = ([], ["--set", "stage2.seed=1"], ["--set", "stage2.seed=2", "--set", "data.seed=1"])
"""Three runs of `tiny` that differ only by seeds (one of them also in its data)."""
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # tiny runs are latency-bound; the machine is shared


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    yield from isolated_bundleflow_home(tmp_path_factory, "compare")


@pytest.fixture(scope="module")
def runs(env) -> list[Path]:
    root = env / "runs"
    for extra in SEED_SETS:
        proc = run_cli(
            "train", "--preset", "tiny", "--device", "cpu", "--no-progress",
            "--runs-dir", str(root), *extra, env=ONE_THREAD,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
    found = sorted(p for p in root.iterdir() if p.is_dir())
    assert len(found) == 3
    return found


def _report(run: Path) -> dict:
    return json.loads((run / "report.json").read_text())


def _compare(capsys, *args: str) -> str:
    capsys.readouterr()
    assert main(["compare", *args]) == 0
    return capsys.readouterr().out


def _json(capsys, *args: str) -> dict:
    out = _compare(capsys, *args, "--json")
    assert out.count("\n") == 1  # one object, nothing else on stdout
    return json.loads(out)


def test_one_group_with_the_mean_and_spread_of_the_reports(runs, capsys):
    revenues = [_report(r)["revenue"]["mean"] for r in runs]
    ratios = [_report(r)["ratio_to_best_baseline"]["ratio"] for r in runs]
    mean = sum(revenues) / len(revenues)

    text = _compare(capsys, str(runs[0].parent / "*"))  # a quoted glob, expanded by compare
    lines = text.splitlines()
    assert all(r.name in text for r in runs)
    group_lines = lines[lines.index(next(x for x in lines if x.startswith("groups "))) + 2 :]
    assert len(group_lines) == 1  # one group of three
    assert group_lines[0].split()[:3] == ["1", "3", "tiny"]
    assert f"{mean:.5g}" in group_lines[0]
    assert f"{min(revenues):.5g}–{max(revenues):.5g}" in group_lines[0]

    payload = _json(capsys, str(runs[0].parent / "*"))
    (group,) = payload["groups"]
    assert group["runs"] == [r.name for r in runs]
    assert group["seeds_varied"] == ["data.seed", "stage2.seed"]
    assert group["revenue"]["mean"] == pytest.approx(mean, rel=1e-12)
    assert group["revenue"]["std"] == pytest.approx(statistics.stdev(revenues), rel=1e-12)
    assert (group["revenue"]["min"], group["revenue"]["max"]) == (min(revenues), max(revenues))
    assert group["ratio"]["mean"] == pytest.approx(sum(ratios) / 3, rel=1e-12)


def test_json_round_trips_and_carries_the_reports_figures(runs, capsys):
    out = _compare(capsys, *map(str, runs), "--json")
    payload = json.loads(out)
    assert json.dumps(payload) + "\n" == out
    assert [r["run"] for r in payload["runs"]] == [r.name for r in runs]
    seeds = [(r["seeds"]["data"], r["seeds"]["stage2"]) for r in payload["runs"]]
    assert seeds == [(0, 0), (0, 1), (1, 2)]
    for row, run in zip(payload["runs"], runs, strict=True):
        report = _report(run)
        assert row["state"] == "done" and row["preset"] == "tiny" and row["device"] == "cpu"
        assert row["revenue"]["mean"] == report["revenue"]["mean"]
        assert row["revenue"]["ci95"] == report["revenue"]["ci95"]
        assert row["ratio"]["ci95"] == report["ratio_to_best_baseline"]["ci95"]
        assert row["best_baseline"] == report["best_baseline"]
        assert row["wall_time"] == report["wall_time"]


def test_csv_to_a_file_and_to_stdout(runs, env, capsys):
    out_file = env / "compare.csv"
    text = _compare(capsys, str(runs[0].parent / "*"), "--csv", str(out_file))
    assert "groups of runs" in text  # the table still goes to stdout
    from_file = list(csv.DictReader(out_file.open()))
    from_stdout = list(csv.DictReader(io.StringIO(_compare(capsys, *map(str, runs), "--csv", "-"))))
    assert from_file == from_stdout
    assert [row["run"] for row in from_file] == [r.name for r in runs]
    for row, run in zip(from_file, runs, strict=True):
        report = _report(run)
        assert float(row["revenue"]) == report["revenue"]["mean"]
        assert float(row["ratio_ci_low"]) == report["ratio_to_best_baseline"]["ci95"][0]
        assert row["group"] == "1" and row["state"] == "done"


def test_plot_is_a_png(runs, env, capsys):
    png = env / "plots" / "compare.png"
    png.parent.mkdir()
    _compare(capsys, str(runs[0].parent / "*"), "--plot", str(png))
    data = png.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000


def test_unfinished_and_different_runs(runs, env, capsys):
    """A run without a report is listed with its state (not counted in the group's figures);
    a run with another non-seed setting forms its own group."""
    extra = env / "extra"
    killed, other = extra / "tiny-killed", extra / "tiny-other"
    shutil.copytree(runs[0], killed)
    (killed / "report.json").unlink()
    shutil.copytree(runs[1], other)
    config = yaml.safe_load((other / "config.yaml").read_text())
    config["menu"]["size"] = 16
    (other / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))

    payload = _json(capsys, str(runs[0].parent / "*"), str(extra / "*"))
    by_name = {r["run"]: r for r in payload["runs"]}
    assert by_name["tiny-killed"]["state"] == "incomplete"
    assert by_name["tiny-killed"]["progress"]["stage"] == 2
    assert by_name["tiny-killed"]["revenue"] is None
    assert by_name["tiny-killed"]["group"] == 1 and by_name["tiny-other"]["group"] == 2
    # both groups' launch records read "tiny": the setting names what tells them apart
    assert [g["setting"] for g in payload["groups"]] == [
        "tiny [menu.size=32]",
        "tiny [menu.size=16]",
    ]
    first = payload["groups"][0]
    assert (len(first["runs"]), first["finished"]) == (4, 3)
    assert first["revenue"]["mean"] == pytest.approx(
        statistics.fmean(_report(r)["revenue"]["mean"] for r in runs), rel=1e-12
    )
    text = _compare(capsys, str(runs[0].parent / "*"), str(extra / "*"))
    assert "incomplete (stage 2, step" in text


def test_pattern_matching_nothing_is_a_user_error(env):
    pattern = str(env / "runs" / "nothing-*")
    (line,) = cli_error(run_cli("compare", pattern))
    assert pattern in line and "matches nothing" in line


def test_not_a_run_directory_is_a_user_error(runs, env):
    (line,) = cli_error(run_cli("compare", str(runs[0]), str(env / "runs")))
    assert f"{env / 'runs'}: not a bundleflow run directory" in line
    assert "it holds 3 run directories" in line  # and says what to pass instead


@pytest.mark.parametrize("name", ["missing-dir", "compare-file.txt"])
def test_missing_path_or_file_is_a_user_error(env, capsys, name):
    path = env / name
    if name.endswith(".txt"):
        path.write_text("not a run\n")
    capsys.readouterr()
    assert main(["compare", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"bundleflow: error: {path}: ") and "Traceback" not in err


def test_json_and_csv_on_stdout_together_is_a_user_error(runs, capsys):
    capsys.readouterr()
    assert main(["compare", str(runs[0]), "--json", "--csv", "-"]) == 2
    assert "give one of them" in capsys.readouterr().err


def test_the_table_shows_each_runs_data_and_budgets(runs, env, capsys):
    """A run on a --data file with --max-steps/--max-time read as the preset's, untouched
    ("tiny", no overrides): the table had neither column (only the plot's legend)."""
    on_file = env / "budgets" / "tiny-on-file"
    shutil.copytree(runs[0], on_file)
    info = json.loads((on_file / "run.json").read_text())
    info["launch"].update(data="/data/regions5.safetensors", max_steps=400, max_time=60.0)
    (on_file / "run.json").write_text(json.dumps(info))

    lines = _compare(capsys, str(runs[0]), str(on_file)).splitlines()
    head = lines[0].split()
    assert "data" in head and "budgets" in head
    generated, from_file = lines[1], lines[2]
    assert "cats arbitrary-upv m=6 n=400" in generated and " none " in generated
    assert "regions5.safetensors" in from_file and "400 steps, 60 s" in from_file
    rows = list(csv.DictReader(io.StringIO(_compare(capsys, str(on_file), "--csv", "-"))))
    assert (rows[0]["data"], rows[0]["max_steps"], rows[0]["max_time"]) == (
        "regions5.safetensors",
        "400",
        "60.0",
    )
