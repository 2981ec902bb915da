"""Checkpoint directories: safetensors + manifest with sha256, atomic, pruned, resumable."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from bundleflow import __version__
from bundleflow.errors import BundleflowError
from bundleflow.train import checkpoint
from bundleflow.train.checkpoint import (
    MANIFEST,
    latest,
    load_optimizer_tensors,
    optimizer_tensors,
    prune,
    read_checkpoint,
    read_manifest,
    replace_checkpoint,
    write_checkpoint,
)


def _components() -> dict:
    gen = torch.Generator().manual_seed(0)
    return {
        "menu": {"means": torch.randn(4, 3, 5, generator=gen), "prices": torch.rand(4)},
        "rng": {"state": torch.arange(7, dtype=torch.uint8), "step": torch.tensor(3)},
    }


def test_round_trip_gives_the_same_tensors_and_a_complete_manifest(tmp_path):
    components = _components()
    config = {"menu": {"size": 4}, "name": "t"}
    path = write_checkpoint(
        tmp_path / "ckpt", components, step=12, config=config, extra={"note": [1, 2]}
    )
    assert path == tmp_path / "ckpt"
    assert sorted(p.name for p in path.iterdir()) == [
        MANIFEST,
        "menu.safetensors",
        "rng.safetensors",
    ]
    loaded, manifest = read_checkpoint(path)
    assert loaded.keys() == components.keys()
    for name, tensors in components.items():
        assert loaded[name].keys() == tensors.keys()
        for key, value in tensors.items():
            assert loaded[name][key].dtype == value.dtype
            assert torch.equal(loaded[name][key], value)
    assert manifest["step"] == 12 and manifest["config"] == config
    assert manifest["extra"] == {"note": [1, 2]}
    assert manifest["package_version"] == __version__
    assert manifest["build"]["torch"] == torch.__version__
    # checksums recorded are the files' sha256, computed independently here
    for filename, digest in manifest["files"].items():
        assert digest == hashlib.sha256((path / filename).read_bytes()).hexdigest()
    assert json.loads((path / MANIFEST).read_text()) == manifest


def test_a_flipped_byte_is_a_checksum_mismatch(tmp_path):
    path = write_checkpoint(tmp_path / "ckpt", _components(), step=1)
    target = path / "menu.safetensors"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0x01  # a tensor byte: the file still parses, only the checksum sees it
    target.write_bytes(bytes(data))
    with pytest.raises(BundleflowError, match="checksum mismatch") as exc:
        read_checkpoint(path)
    assert "menu.safetensors" in str(exc.value)


def test_missing_file_and_missing_manifest_are_errors(tmp_path):
    path = write_checkpoint(tmp_path / "ckpt", _components(), step=1)
    (path / "rng.safetensors").unlink()
    with pytest.raises(BundleflowError, match="missing"):
        read_checkpoint(path)
    with pytest.raises(BundleflowError, match="not a checkpoint"):
        read_checkpoint(tmp_path)


def test_unknown_format_is_refused(tmp_path):
    path = write_checkpoint(tmp_path / "ckpt", _components(), step=1)
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["format"] = 99
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleflowError, match="format 99"):
        read_manifest(path)


def test_an_existing_directory_is_never_overwritten(tmp_path):
    write_checkpoint(tmp_path / "ckpt", _components(), step=1)
    before = (tmp_path / "ckpt" / MANIFEST).read_bytes()
    with pytest.raises(FileExistsError):
        write_checkpoint(tmp_path / "ckpt", {"menu": {"x": torch.zeros(1)}}, step=2)
    assert (tmp_path / "ckpt" / MANIFEST).read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_no_temporary_directory_is_left_after_success(tmp_path):
    write_checkpoint(tmp_path / "a" / "ckpt", _components(), step=1)
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["ckpt"]
    assert not list((tmp_path / "a" / "ckpt").glob("*.tmp"))


def test_failure_mid_write_leaves_nothing(tmp_path, monkeypatch):
    real_save = checkpoint.save_file
    calls = []

    def save_then_fail(tensors, filename):
        calls.append(filename)
        if len(calls) == 2:  # the first component is already on disk
            raise OSError(28, "No space left on device")
        return real_save(tensors, filename)

    monkeypatch.setattr(checkpoint, "save_file", save_then_fail)
    with pytest.raises(BundleflowError, match=r"No space left on device\); free disk space"):
        write_checkpoint(tmp_path / "ckpt", _components(), step=1)
    assert len(calls) == 2
    assert list(tmp_path.iterdir()) == []


def test_prune_keeps_the_newest(tmp_path):
    for step in (5, 40, 300, 2000, 10):
        write_checkpoint(
            tmp_path / f"step-{step:09d}", {"m": {"x": torch.tensor([step])}}, step=step
        )
    (tmp_path / "step-999999999").mkdir()  # incomplete (no manifest): neither kept nor counted
    (tmp_path / "best").mkdir()
    prune(tmp_path, keep=2)
    remaining = sorted(p.name for p in tmp_path.iterdir())
    assert remaining == ["best", "step-000000300", "step-000002000", "step-999999999"]
    assert latest(tmp_path) == tmp_path / "step-000002000"
    prune(tmp_path, keep=5)  # keeping more than there are removes nothing
    assert len(list(tmp_path.glob("step-*"))) == 3


def test_latest_of_nothing(tmp_path):
    assert latest(tmp_path) is None


def test_replace_checkpoint_swaps_in_the_new_copy(tmp_path):
    target = tmp_path / "best"
    replace_checkpoint(target, {"menu": {"x": torch.tensor([1.0])}}, step=10)
    replace_checkpoint(target, {"menu": {"x": torch.tensor([2.0])}}, step=20, extra={"v": 3})
    components, manifest = read_checkpoint(target)
    assert torch.equal(components["menu"]["x"], torch.tensor([2.0]))
    assert manifest["step"] == 20 and manifest["extra"] == {"v": 3}
    assert [p.name for p in tmp_path.iterdir()] == ["best"]  # no .best.new / .best.old left


def test_replace_checkpoint_cleans_a_stale_staging_copy(tmp_path):
    write_checkpoint(tmp_path / ".best.new", {"menu": {"x": torch.tensor([9.0])}}, step=1)
    replace_checkpoint(tmp_path / "best", {"menu": {"x": torch.tensor([1.0])}}, step=2)
    components, _ = read_checkpoint(tmp_path / "best")
    assert torch.equal(components["menu"]["x"], torch.tensor([1.0]))
    assert [p.name for p in tmp_path.iterdir()] == ["best"]


def _model_and_adam(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    groups = [
        {"params": list(model[0].parameters()), "lr": 0.05},
        {"params": list(model[2].parameters()), "lr": 0.01, "betas": (0.8, 0.95)},
    ]
    return model, torch.optim.Adam(groups)


def _adam_step(model, optimizer, x, y):
    optimizer.zero_grad()
    loss = (model(x) - y).pow(2).mean()
    loss.backward()
    optimizer.step()


def test_optimizer_state_round_trip_gives_identical_next_steps(tmp_path):
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 3, generator=gen), torch.randn(16, 1, generator=gen)
    model, optimizer = _model_and_adam(0)
    for _ in range(3):
        _adam_step(model, optimizer, x, y)
    tensors, rest = optimizer_tensors(optimizer)
    assert all(isinstance(v, torch.Tensor) for v in tensors.values())
    write_checkpoint(
        tmp_path / "ckpt",
        {"model": model.state_dict(), "optimizer": tensors},
        step=3,
        extra={"optimizer": rest},  # the non-tensor part travels through JSON
    )

    components, manifest = read_checkpoint(tmp_path / "ckpt")
    restored, restored_opt = _model_and_adam(123)  # different initial weights
    restored.load_state_dict(components["model"])
    load_optimizer_tensors(restored_opt, components["optimizer"], manifest["extra"]["optimizer"])
    assert restored_opt.param_groups[1]["lr"] == 0.01
    assert tuple(restored_opt.param_groups[1]["betas"]) == (0.8, 0.95)

    for _ in range(2):
        _adam_step(model, optimizer, x, y)
        _adam_step(restored, restored_opt, x, y)
    for a, b in zip(model.parameters(), restored.parameters(), strict=True):
        assert torch.equal(a, b)
    # A fresh Adam from the same weights would not match: the moments matter.
    fresh_model, fresh_opt = _model_and_adam(5)
    fresh_model.load_state_dict(components["model"])
    _adam_step(fresh_model, fresh_opt, x, y)
    once, once_opt = _model_and_adam(5)
    once.load_state_dict(components["model"])
    load_optimizer_tensors(once_opt, components["optimizer"], manifest["extra"]["optimizer"])
    _adam_step(once, once_opt, x, y)
    assert not torch.equal(fresh_model[0].weight, once[0].weight)
