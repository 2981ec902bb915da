"""Presets: shipped inside the package, listed by `bundleflow presets`, resolved by `config`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest
import yaml

from bundleflow.cli.app import main
from bundleflow.train import config as cfg
from bundleflow.train.config import load_config
from tests.conftest import cli_env, run_cli

REPO = Path(__file__).resolve().parents[1]


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------- packaging


def test_package_list_covers_every_subpackage_and_maps_configs():
    """pyproject lists packages by hand (find cannot see configs/ as bundleflow.presets): a
    new subpackage missing from that list would be absent from wheels."""
    tomllib = pytest.importorskip("tomllib")
    setup = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {
        ".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "bundleflow").rglob("*.py")
    }
    configs = {
        ".".join(("bundleflow", "presets", *d.relative_to(REPO / "configs").parts))
        for d in [REPO / "configs", *(REPO / "configs").rglob("*")]
        if d.is_dir() and any(d.glob("*.yaml"))
    }
    assert configs == {"bundleflow.presets", "bundleflow.presets.accelerate"}
    assert set(setup["packages"]) == on_disk | configs
    assert setup["package-dir"] == {"bundleflow.presets": "configs"}
    for package in configs:
        assert setup["package-data"][package] == ["*.yaml"]


def test_checkout_finds_the_presets_in_configs():
    assert cfg.CONFIG_DIR.resolve() == (REPO / "configs").resolve()
    assert {"default", "paper-m50", "additive-m2"} <= set(cfg.preset_names())
    assert "accelerate" not in " ".join(cfg.preset_names())  # launch configs are not presets
    assert cfg.preset_path("default") == cfg.CONFIG_DIR / "default.yaml"


def test_no_presets_found_says_so_instead_of_an_empty_list(tmp_path, monkeypatch):
    monkeypatch.setattr(cfg, "CONFIG_DIR", tmp_path)
    with pytest.raises(cfg.BundleflowError, match=r"no presets found in .*reinstall"):
        cfg.preset_path("default")


def _build_wheel_and_venv(tmp: Path) -> Path:
    """A wheel of this checkout installed (``--no-deps``) into a fresh venv; returns its python.

    The sources are copied first so the build's build/ and egg-info stay out of the checkout.
    The venv sees this interpreter's packages (torch, ...) through a ``.pth`` line: with
    ``--system-site-packages`` alone a venv made from a venv sees the *base* interpreter's.
    A plain path line does not run that directory's own ``.pth`` files, so an editable
    install of bundleflow there stays invisible and the wheel's copy is the one imported.
    """
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("bundleflow", "configs"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    wheels = tmp / "wheels"
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(src)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = wheels.glob("bundleflow-*.whl")
    env_dir = tmp / "venv"
    venv.create(env_dir, system_site_packages=True, with_pip=False)
    python = env_dir / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    here = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(site) / "outer-packages.pth").write_text("\n".join(sorted(here)) + "\n")
    subprocess.run(
        [*pip, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    return python


LOOKUP = """
import bundleflow, bundleflow.train.config as c
assert c.load_config("paper-m50").data.n_items == 50
c.load_config("default")
print(bundleflow.__file__, c.CONFIG_DIR)
"""


@pytest.mark.slow
def test_wheel_installed_elsewhere_ships_the_presets(tmp_path):
    """Issue 15 item 5: a wheel (and so `pip install .`) used to ship no presets."""
    python = _build_wheel_and_venv(tmp_path)
    outside = tmp_path / "elsewhere"  # no configs/ and no bundleflow/ next to the cwd
    outside.mkdir()
    env = {"PYTHONPATH": None, "BUNDLEFLOW_HOME": None, "BUNDLEFLOW_CACHE": str(tmp_path / "cache")}

    def bundleflow(*argv: str) -> subprocess.CompletedProcess:
        return run_cli(*argv, python=python, cwd=outside, env=env)

    lookup = subprocess.run(
        [str(python), "-c", LOOKUP], cwd=outside, env=cli_env(env), capture_output=True, text=True
    )
    assert lookup.returncode == 0, lookup.stderr  # before: unknown preset 'default'; presets:
    module, config_dir = lookup.stdout.split()
    installed = Path(module).parent
    assert installed.is_relative_to(tmp_path / "venv"), module  # the wheel's copy, not the repo
    assert Path(config_dir) == installed / "presets"

    listed = bundleflow("presets", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {row["name"]: row for row in json.loads(listed.stdout)["presets"]}
    assert {"default", "paper-m50"} <= set(rows)
    assert set(rows) == set(cfg.preset_names())  # every preset of the checkout, no more
    assert rows["default"]["description"].startswith("The main job")
    for name in ("single_gpu", "multi_gpu", "cpu_debug"):
        assert (installed / "presets" / "accelerate" / f"{name}.yaml").is_file()

    shown = bundleflow("config", "--preset", "paper-m50", "--set", "menu.size=7")
    assert shown.returncode == 0, shown.stderr
    resolved = yaml.safe_load(shown.stdout)
    assert resolved["data"]["n_items"] == 50 and resolved["menu"]["size"] == 7

    unknown = bundleflow("config", "--preset", "nosuch")
    assert unknown.returncode == 2
    assert "unknown preset 'nosuch'; presets: " in unknown.stderr
    assert all(name in unknown.stderr for name in ("default", "paper-m50"))


# --------------------------------------------------------------------------- bundleflow presets


def test_presets_lists_every_preset_with_its_first_comment_line(capsys):
    code, out, _ = _run(capsys, "presets")
    assert code == 0
    lines = out.splitlines()
    assert [line.split()[0] for line in lines] == cfg.preset_names()
    default = next(line for line in lines if line.split()[0] == "default")
    first = (cfg.CONFIG_DIR / "default.yaml").read_text().splitlines()[0]
    assert default.endswith(first.lstrip("# "))
    assert "The main job" in default


def test_presets_json_is_one_object(capsys):
    code, out, _ = _run(capsys, "presets", "--json")
    assert code == 0
    rows = json.loads(out)["presets"]
    assert [row["name"] for row in rows] == cfg.preset_names()
    paper = next(row for row in rows if row["name"] == "paper-m50")
    assert paper["description"].startswith("The paper's setting with the reference's defaults")
    assert load_config(paper["path"]) == load_config("paper-m50")


def test_description_is_only_a_leading_comment(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("\n# What this preset is for.\n# More.\nname: x\n")
    assert cfg.preset_description(path) == "What this preset is for."
    path.write_text("name: x  # not a description\n# nor this\n")
    assert cfg.preset_description(path) == ""


# --------------------------------------------------------------------------- bundleflow config


def test_config_prints_the_resolved_config_as_a_loadable_preset(tmp_path, capsys):
    code, out, _ = _run(
        capsys, "config", "--preset", "default", "--set", "menu.size=7", "--device", "cpu"
    )
    assert code == 0
    expected = load_config("default", {"menu": {"size": 7}, "device": "cpu"})
    assert expected.menu.size == 7 and expected.device == "cpu"
    saved = tmp_path / "resolved.yaml"
    saved.write_text(out)
    assert load_config(str(saved)) == expected  # the output round-trips as a preset
    assert yaml.safe_load(out)["stage2"]["inv_temp"]["growth"] == expected.stage2.inv_temp.growth


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--set", "menu.bogus=1"], "unknown config key 'menu.bogus'; valid keys in menu:"),
        (["--set", "menu.size"], "expected KEY=VALUE"),
        (["--set", "menu.size=abc"], "config key 'menu.size': expected an integer"),
        (["--preset", "nosuch"], "unknown preset 'nosuch'; presets: "),
        (["--preset", "missing.yaml"], "missing.yaml: preset file not found"),
    ],
)
def test_config_user_errors_exit_2_with_one_line(capsys, argv, needle):
    code, out, err = _run(capsys, "config", *argv)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bundleflow: error: "), err
    assert needle in lines[0]
    if "unknown preset" in needle:
        assert all(name in lines[0] for name in cfg.preset_names())


def test_config_with_data_takes_m_from_the_file(tmp_path, capsys):
    """`config --data FILE` shows what `train --data FILE` trains: the file's m (6 here,
    the preset says 20), kind file with its absolute path, the file's money scale."""
    from bundleflow.valuations.io import generate_dataset

    data = generate_dataset(tmp_path / "d.safetensors", "arbitrary", 6, 60, seed=1)
    code, out, _ = _run(capsys, "config", "--preset", "default", "--data", str(data))
    assert code == 0
    resolved = yaml.safe_load(out)
    assert resolved["data"]["n_items"] == 6
    assert resolved["data"]["kind"] == "file" and resolved["data"]["path"] == str(data.resolve())
    assert resolved["data"]["money_scale"] is None
