"""`bundleflow data generate | stats | convert`: the CLI contract (flags, --json, exit codes)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from bundleflow.cli.app import main
from bundleflow.cli.data import ProgressBar
from tests.conftest import cli_error, run_cli

STATS_KEYS = {
    "mean_atoms",
    "share_six_atoms",
    "mean_atom_size",
    "median_atom_size",
    "mean_max_value",
    "value_min",
    "value_max",
}


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _generate(capsys, out: Path, *extra: str) -> dict:
    code, stdout, _ = _run(
        capsys,
        "data", "generate", "--dist", "regions", "--items", "9", "--n", "40", "--seed", "3",
        "--out", str(out), "--json", "--no-progress", *extra,
    )  # fmt: skip
    assert code == 0
    return json.loads(stdout)


def test_generate_json_is_one_object_with_the_statistics(tmp_path, capsys):
    result = _generate(capsys, tmp_path / "r.safetensors")
    assert result.keys() >= STATS_KEYS
    assert result["n"] == 40 and result["n_items"] == 9 and result["atoms_per_row"] == 6
    assert result["split"] == {"train": 36, "val": 2, "test": 2}
    assert (tmp_path / "r.safetensors").exists()


def test_generate_records_every_parameter_flag(tmp_path, capsys):
    _generate(
        capsys, tmp_path / "p.safetensors",
        "--values", "npv", "--mode", "fixed", "--split", "0.8,0.1,0.1",
        "--max-substitutable-bids", "2", "--jump-prob", "0.2", "--budget-factor", "2",
        "--normal-stdev", "10",
    )  # fmt: skip
    code, out, _ = _run(capsys, "data", "stats", str(tmp_path / "p.safetensors"), "--json")
    assert code == 0
    stats = json.loads(out)
    gen = stats["generator"]
    assert (gen["values"], gen["mode"]) == ("npv", "fixed")
    assert gen["params"]["max_substitutable_bids"] == 2 and gen["params"]["jump_prob"] == 0.2
    assert gen["params"]["budget_factor"] == 2.0 and gen["params"]["normal_stdev"] == 10.0
    assert stats["atoms_per_row"] == 3
    assert stats["split"] == {"train": 32, "val": 4, "test": 4}
    assert "--max-substitutable-bids 2" in stats["regenerate"]


def test_generate_is_reproducible_from_the_cli(tmp_path, capsys):
    a = _generate(capsys, tmp_path / "a.safetensors")
    b = _generate(capsys, tmp_path / "b.safetensors")
    c = _generate(capsys, tmp_path / "c.safetensors", "--seed", "4")
    assert a["sha256"] == b["sha256"] != c["sha256"]
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_stats_and_convert(tmp_path, capsys):
    v = torch.zeros(20, 2, 4)
    v[:, 0, 0] = 1
    v[:, 0, -1] = torch.arange(1, 21, dtype=torch.float32)
    torch.save(v, tmp_path / "ref.pt")
    code, out, _ = _run(capsys, "data", "stats", str(tmp_path / "ref.pt"), "--json")
    assert code == 0
    stats = json.loads(out)
    assert stats["mean_atoms"] == 1 and stats["mean_max_value"] == 10.5
    assert stats["split_origin"] == "reference" and stats["split"]["test"] == 1
    code, out, _ = _run(
        capsys, "data", "convert", str(tmp_path / "ref.pt"), str(tmp_path / "ref.safetensors")
    )
    assert code == 0
    code, out, _ = _run(capsys, "data", "stats", str(tmp_path / "ref.safetensors"))
    assert code == 0 and "mean_atoms" in out and "split_origin: recorded" in out


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["data", "stats", "{tmp}/missing.safetensors"], "missing.safetensors: no such file"),
        (["data", "stats", "{tmp}/garbage.pt"], "garbage.pt: not a readable torch file"),
        (["data", "convert", "{tmp}/garbage.pt", "{tmp}/x.safetensors"], "garbage.pt"),
        (
            [
                "data",
                "generate",
                "--dist",
                "arbitrary",
                "--items",
                "5",
                "--n",
                "5",
                "--seed",
                "0",
                "--out",
                "{tmp}/x.pt",
            ],
            "x.pt: generated sets are saved as .safetensors",
        ),
        (
            [
                "data",
                "generate",
                "--dist",
                "regions",
                "--items",
                "5",
                "--n",
                "5",
                "--seed",
                "0",
                "--out",
                "{tmp}/x.safetensors",
                "--additional-location",
                "1",
            ],
            "--additional-location",
        ),
        (
            [
                "data",
                "generate",
                "--dist",
                "regions",
                "--items",
                "3",
                "--n",
                "5",
                "--seed",
                "0",
                "--out",
                "{tmp}/x.safetensors",
            ],
            "at least 4 goods",
        ),
    ],  # fmt: skip
)
def test_user_errors_exit_2_with_one_line(tmp_path, capsys, argv, needle):
    (tmp_path / "garbage.pt").write_bytes(b"PK\x03\x04 this is not a zip")
    code, out, err = _run(capsys, *(a.format(tmp=tmp_path) for a in argv))
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("bundleflow: error: ")
    assert needle in err and "Traceback" not in err
    assert not (tmp_path / "x.safetensors").exists(), "no partly written output"


def test_no_traceback_from_the_real_process(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("goods 3\nbids 2\ndummy 0\n0\t1.0\t0\t#\n1\t2.0\t7\t#\n")
    proc = run_cli("data", "stats", str(bad), "--json")
    assert proc.stdout == ""
    assert cli_error(proc) == [
        f"bundleflow: error: {bad}:5: good 7 out of range; goods are 0..2 and dummy goods 3..2"
    ]


def test_help_for_every_action(capsys):
    for action in ("generate", "stats", "convert"):
        with pytest.raises(SystemExit) as exit_info:
            main(["data", action, "--help"])
        assert exit_info.value.code == 0
        assert "usage: bundleflow data " + action in capsys.readouterr().out


def test_progress_bar_draws_on_a_terminal_only():
    stream = io.StringIO()
    bar = ProgressBar(10, "gen", stream=stream, enabled=True)
    for done in (5, 10):
        bar(done)
    text = stream.getvalue()
    assert "10/10" in text and text.endswith("\n")
    quiet = io.StringIO()
    ProgressBar(10, "gen", stream=quiet)(10)  # StringIO is not a terminal
    assert quiet.getvalue() == ""
