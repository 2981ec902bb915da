"""Checkpoints, defined once: a directory of safetensors files plus a JSON manifest.

    CKPT_DIR/
      <name>.safetensors ...   one per component (menu, optimizer, rng, flow, ...)
      manifest.json            format, package version, torch build, config, step, extra,
                               and the sha256 of every file

A checkpoint directory is written under a temporary name, every file fsynced, then renamed
into place: a reader sees a complete checkpoint or none. Loading verifies every checksum,
so a damaged file is reported, never used. Only tensors are stored (no pickles).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from bundleflow import __version__
from bundleflow.atomic import atomic_write_bytes, fsync_dir
from bundleflow.errors import BundleflowError

CHECKPOINT_FORMAT = 1
MANIFEST = "manifest.json"


def torch_build() -> dict:
    """The torch build a checkpoint was written with."""
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    }


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checkpoint(
    directory: str | Path,
    components: dict[str, dict[str, Tensor]],
    *,
    step: int,
    config: dict | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``components`` (name -> tensors) as a checkpoint directory, atomically.

    ``directory`` must not exist yet (checkpoints are never overwritten in place).
    """
    target = Path(directory)
    if target.exists():
        raise FileExistsError(f"{target}: checkpoint already exists")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        files = {}
        for name, tensors in components.items():
            path = tmp / f"{name}.safetensors"
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
            files[path.name] = sha256_file(path)
        manifest = {
            "format": CHECKPOINT_FORMAT,
            "package_version": __version__,
            "build": torch_build(),
            "step": int(step),
            "config": config or {},
            "extra": extra or {},
            "files": files,
        }
        atomic_write_bytes(tmp / MANIFEST, json.dumps(manifest, indent=2).encode())
        fsync_dir(tmp)
        os.rename(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def read_manifest(directory: str | Path) -> dict:
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise BundleflowError(f"{directory}: not a checkpoint (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, OSError) as err:
        raise BundleflowError(f"{path}: unreadable manifest ({err})") from err
    if manifest.get("format") != CHECKPOINT_FORMAT:
        raise BundleflowError(
            f"{path}: checkpoint format {manifest.get('format')!r}; this bundleflow reads "
            f"format {CHECKPOINT_FORMAT}"
        )
    return manifest


def read_checkpoint(
    directory: str | Path, *, device: str | torch.device = "cpu"
) -> tuple[dict[str, dict[str, Tensor]], dict]:
    """Verify every checksum, then load every component: ``(components, manifest)``."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    components = {}
    for filename, expected in manifest["files"].items():
        path = directory / filename
        if not path.is_file():
            raise BundleflowError(f"{path}: missing from the checkpoint")
        if sha256_file(path) != expected:
            raise BundleflowError(f"{path}: checksum mismatch; the checkpoint is damaged")
        try:
            components[filename.removesuffix(".safetensors")] = load_file(str(path), str(device))
        except SafetensorError as err:
            raise BundleflowError(f"{path}: unreadable ({err})") from err
    return components, manifest


def prune(parent: str | Path, keep: int, prefix: str = "step-") -> None:
    """Keep the ``keep`` newest ``prefix*`` checkpoints under ``parent``."""
    found = sorted(p for p in Path(parent).glob(f"{prefix}*") if (p / MANIFEST).is_file())
    for old in found[: max(0, len(found) - keep)]:
        shutil.rmtree(old, ignore_errors=True)


def latest(parent: str | Path, prefix: str = "step-") -> Path | None:
    """The newest complete checkpoint under ``parent`` (names sort by step)."""
    found = sorted(p for p in Path(parent).glob(f"{prefix}*") if (p / MANIFEST).is_file())
    return found[-1] if found else None


def replace_checkpoint(
    directory: str | Path, components: dict[str, dict[str, Tensor]], **kw: Any
) -> Path:
    """Write a checkpoint that replaces ``directory`` (e.g. ``best``) without a gap.

    The new one is written beside it, then the old one is moved away and the new one into
    place; if the process dies in between, the newest complete copy is still on disk.
    """
    target = Path(directory)
    staged = target.with_name(f".{target.name}.new")
    if staged.exists():
        shutil.rmtree(staged)
    write_checkpoint(staged, components, **kw)
    old = target.with_name(f".{target.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.rename(target, old)
    os.rename(staged, target)
    fsync_dir(target.parent)
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(old)
    return target


# --------------------------------------------------------------------------- optimizer state


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict]:
    """Split an optimizer's state dict into tensors and a JSON-able rest."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, Tensor):
                tensors[f"{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def load_optimizer_tensors(
    optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor], rest: dict
) -> None:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    for name, value in rest.get("scalars", {}).items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": rest["param_groups"]})
