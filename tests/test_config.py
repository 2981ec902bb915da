"""The config schema: strict loading (unknown keys, types, choices, sizes), --set, presets."""

from __future__ import annotations

from pathlib import Path

import pytest

from bundleflow.errors import BundleflowError
from bundleflow.train.config import (
    CONFIG_DIR,
    Config,
    load_config,
    parse_set,
    preset_path,
    replace,
    to_dict,
    to_flat_dict,
)
from tests.conftest import cli_error, run_cli

PRESETS = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def _error(overrides: dict, preset: str | None = None) -> str:
    with pytest.raises(BundleflowError) as exc:
        load_config(preset, overrides)
    return str(exc.value)


# --------------------------------------------------------------------------- unknown keys


def test_unknown_top_level_key_is_named_with_the_valid_keys():
    message = _error({"stage3": {"steps": 1}})
    assert "'stage3'" in message
    for section in ("data", "flow", "stage1", "menu", "stage2", "eval"):
        assert section in message


def test_unknown_nested_key_is_named_dotted():
    assert "'stage2.lrr'" in _error({"stage2": {"lrr": 1}})
    assert "'stage2.inv_temp.groth'" in _error({"stage2": {"inv_temp": {"groth": 1.1}}})


def test_unknown_key_in_a_preset_file_is_named(tmp_path):
    preset = tmp_path / "bad.yaml"
    preset.write_text("menu:\n  size: 10\n  sizee: 3\n")
    assert "'menu.sizee'" in _error({}, preset=str(preset))


# --------------------------------------------------------------------------- types


@pytest.mark.parametrize(
    ("overrides", "key", "expected"),
    [
        ({"stage2": {"lr": "fast"}}, "stage2.lr", "float"),  # str for float
        ({"stage1": {"steps": 2.5}}, "stage1.steps", "integer"),  # float for int
        ({"menu": {"size": True}}, "menu.size", "integer"),  # bool is not an int here
        ({"data": {"n_items": "20"}}, "data.n_items", "integer"),  # quoted number
        ({"stage2": {"exact_density_grad": 1}}, "stage2.exact_density_grad", "true/false"),
        ({"data": {"split": [0.9, 0.1]}}, "data.split", "3 numbers"),
        ({"stage2": {"inv_temp": 3}}, "stage2.inv_temp", "mapping"),
        ({"name": 7}, "name", "str"),
    ],
)
def test_wrong_type_names_the_key_and_the_expected_type(overrides, key, expected):
    message = _error(overrides)
    assert f"'{key}'" in message
    assert expected in message


def test_bool_is_not_a_float():
    assert "'stage2.lr'" in _error({"stage2": {"lr": True}})


def test_int_is_accepted_for_a_float_and_null_for_optional():
    config = load_config(None, {"stage2": {"lr": 1, "patience": None}, "data": {"money_scale": 2}})
    assert config.stage2.lr == 1.0 and isinstance(config.stage2.lr, float)
    assert config.data.money_scale == 2.0 and isinstance(config.data.money_scale, float)
    assert config.stage2.patience is None


# --------------------------------------------------------------------------- choices, sizes


@pytest.mark.parametrize(
    ("overrides", "key", "bad"),
    [
        ({"device": "gpu"}, "device", "gpu"),
        ({"data": {"kind": "csv"}}, "data.kind", "csv"),
        ({"data": {"dist": "paths"}}, "data.dist", "paths"),
        ({"stage2": {"path": "slow"}}, "stage2.path", "slow"),
        ({"mixed_precision": "fp8"}, "mixed_precision", "fp8"),
    ],
)
def test_bad_choice_names_key_value_and_the_choices(overrides, key, bad):
    message = _error(overrides)
    assert f"'{key}'" in message and repr(bad) in message
    if key == "device":
        assert all(choice in message for choice in ("auto", "cuda", "mps", "cpu"))


@pytest.mark.parametrize(
    "key",
    [
        "data.n_items",
        "data.n_samples",
        "menu.size",
        "menu.support",
        "stage1.steps",
        "stage1.batch_size",
        "stage1.log_every",
        "stage2.steps",
        "stage2.batch_size",
        "stage2.eval_every",
        "stage2.checkpoint_every",
        "stage2.inv_temp.interval",
        "eval.batch_size",
    ],
)
@pytest.mark.parametrize("value", [0, -3])
def test_non_positive_sizes_are_refused(key, value):
    assert f"'{key}' must be positive" in _error(parse_set([f"{key}={value}"]))


def test_file_data_needs_a_path():
    assert "'data.path'" in _error({"data": {"kind": "file"}})


def test_config_is_frozen_and_replace_validates():
    config = load_config()
    with pytest.raises(AttributeError):
        config.name = "x"  # type: ignore[misc]
    changed = replace(config, stage2={"steps": 10})
    assert changed.stage2.steps == 10 and config.stage2.steps == Config().stage2.steps
    with pytest.raises(BundleflowError, match="'stage2.stepz'"):
        replace(config, stage2={"stepz": 10})


# --------------------------------------------------------------------------- --set


def test_set_builds_nested_overrides_with_yaml_values():
    parsed = parse_set(
        [
            "menu.size=2000",
            "stage2.lr=0.05",
            "stage2.price_lr=4e-4",  # YAML 1.2 float (PyYAML alone reads a string)
            "stage2.patience=null",
            "stage2.exact_density_grad=true",
            "data.split=[0.8, 0.1, 0.1]",
            "stage2.inv_temp.cap=1.5E+2",
            "name=my run",
        ]
    )
    assert parsed == {
        "menu": {"size": 2000},
        "stage2": {
            "lr": 0.05,
            "price_lr": 0.0004,
            "patience": None,
            "exact_density_grad": True,
            "inv_temp": {"cap": 150.0},
        },
        "data": {"split": [0.8, 0.1, 0.1]},
        "name": "my run",
    }
    config = load_config("default", parsed)
    assert config.data.split == (0.8, 0.1, 0.1)
    assert config.stage2.inv_temp.cap == 150.0
    assert config.stage2.price_lr == 4e-4


def test_set_beats_the_preset():
    preset = load_config("default")
    assert preset.menu.size != 77
    assert load_config("default", parse_set(["menu.size=77"])).menu.size == 77
    assert load_config("default", parse_set(["stage2.lr=0.01"])).stage2.lr == 0.01


@pytest.mark.parametrize("item", ["menu.size", "=3", "menu.size:3", ""])
def test_malformed_set_says_key_value(item):
    with pytest.raises(BundleflowError, match="KEY=VALUE"):
        parse_set([item])


def test_set_value_that_is_not_yaml():
    with pytest.raises(BundleflowError, match="not valid YAML"):
        parse_set(["data.split=[0.8, 0.1"])


def test_set_into_a_scalar_is_refused():
    with pytest.raises(BundleflowError, match="'menu' is not a section"):
        parse_set(["menu=3", "menu.size=4"])


# --------------------------------------------------------------------------- presets


def test_presets_exist():
    assert "default" in PRESETS


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_loads_and_holds_only_overrides(name):
    config = load_config(name)
    assert isinstance(config, Config)
    # by name and by path give the same config
    assert load_config(str(CONFIG_DIR / f"{name}.yaml")) == config
    # the resolved config is its own fixed point (what run directories record)
    assert load_config(None, to_dict(config)) == config
    assert set(to_flat_dict(config)) == set(to_flat_dict(Config()))


def test_default_preset_is_the_main_job():
    config = load_config("default")
    assert (config.data.kind, config.data.dist, config.data.values) == ("cats", "arbitrary", "upv")
    assert config.data.n_items == 20 and config.data.n_samples == 5000
    assert config.menu.size == 1000 and config.menu.support == 8
    assert config.stage1.steps <= 2000 and config.stage2.steps <= 3000


def test_unknown_preset_lists_the_presets():
    with pytest.raises(BundleflowError) as exc:
        preset_path("no-such-preset")
    message = str(exc.value)
    assert "'no-such-preset'" in message
    for name in PRESETS:
        assert name in message


def test_missing_preset_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(BundleflowError, match="preset file not found"):
        load_config(str(missing))


def test_preset_that_is_not_a_mapping(tmp_path):
    preset = tmp_path / "list.yaml"
    preset.write_text("- 1\n- 2\n")
    with pytest.raises(BundleflowError, match="mapping"):
        load_config(str(preset))


def test_preset_file_reads_exponent_floats(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("stage1:\n  lr: 5e-3\nstage2:\n  price_lr: 1e-4\n")
    config = load_config(str(preset))
    assert config.stage1.lr == 0.005 and config.stage2.price_lr == 0.0001


# --------------------------------------------------------------------------- the CLI


def test_cli_unknown_key_exits_2_with_one_line(tmp_path):
    env = {"BUNDLEFLOW_HOME": str(tmp_path), "BUNDLEFLOW_CACHE": str(tmp_path)}
    out = run_cli("train", "--set", "stage2.lrr=1", "--no-progress", cwd=tmp_path, env=env)
    (line,) = cli_error(out)
    assert "'stage2.lrr'" in line
    assert out.stdout == ""
    assert not any(Path(tmp_path).iterdir())  # nothing was created before the config check


def test_set_mixed_precision_no_is_fp32_not_a_yaml_boolean():
    """`--set mixed_precision=no` (documented as the way to ask for fp32) must not fail as
    YAML's false; other string keys still reject booleans."""
    from bundleflow.train.config import load_config, parse_set

    assert load_config("tiny", parse_set(["mixed_precision=no"])).mixed_precision == "no"
    with pytest.raises(BundleflowError, match="data.dist"):
        load_config("tiny", parse_set(["data.dist=no"]))
