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
import errno
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from loguru import logger
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from bundleflow import __version__
from bundleflow.atomic import (
    atomic_write_bytes,
    file_mode,
    file_sha256,
    fsync_dir,
    is_write_failure,
    write_error,
)
from bundleflow.errors import BundleflowError

CHECKPOINT_FORMAT = 1
MANIFEST = "manifest.json"
_SAFE_FILE = re.compile(r"[A-Za-z0-9_-]+\.safetensors")  # no paths, no "..": stays inside


def torch_build() -> dict:
    """The torch build a checkpoint was written with."""
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    }


def _check_finite(components: dict[str, dict[str, Tensor]], where: str) -> None:
    """Refuse NaN/inf in floating tensors: a diverged state is never a good checkpoint."""
    for name, tensors in components.items():
        for key, value in tensors.items():
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise BundleflowError(
                    f"{where}: {name}.{key} holds NaN or infinite values; the run diverged "
                    "before this checkpoint. Resume from an earlier checkpoint and lower "
                    "stage2.lr / stage2.price_lr or the λ cap"
                )


def _temp_prefix(name: str) -> str:
    # The writer's pid is in the name so that a leftover of a killed writer can be told
    # from one being written right now (see clean_stale).
    return f".{name}.{os.getpid()}."


def write_checkpoint(
    directory: str | Path,
    components: dict[str, dict[str, Tensor]],
    *,
    step: int,
    config: dict | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``components`` (name -> tensors) as a checkpoint directory, atomically.

    ``directory`` must not exist yet (checkpoints are never overwritten in place;
    ``FileExistsError`` otherwise). Non-finite tensors are refused and a failed write (full
    disk, unwritable directory) is a :class:`BundleflowError`; either way nothing is left
    behind but the checkpoints that were already complete.
    """
    target = Path(directory)
    if target.exists():
        raise FileExistsError(f"{target}: checkpoint already exists")
    _check_finite(components, str(target))
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f"{_temp_prefix(target.name)}{uuid.uuid4().hex[:8]}.tmp"
        tmp.mkdir()  # mode 0o777 less the umask, like any directory the user makes
    except OSError as err:
        raise write_error(target, err) from None
    try:
        files = {}
        for name, tensors in components.items():
            path = tmp / f"{name}.safetensors"
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
            os.chmod(path, file_mode())  # safetensors creates 0o600; honour the umask
            files[path.name] = file_sha256(path)
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
        os.rename(tmp, target)  # the commit point: before it no `target`, after it a whole one
        fsync_dir(target.parent)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError) and err.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise FileExistsError(f"{target}: checkpoint already exists") from None
        if isinstance(err, (OSError, SafetensorError)) and is_write_failure(err):
            raise write_error(target, err) from None
        if isinstance(err, BundleflowError) and str(err).startswith(str(tmp)):
            # atomic_write_bytes names the temporary directory; name the checkpoint instead
            raise BundleflowError(str(err).replace(str(tmp / MANIFEST), str(target))) from None
        raise
    return target


def read_manifest(directory: str | Path) -> dict:
    """The manifest of a checkpoint directory, checked for shape (not yet the checksums)."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise BundleflowError(f"{directory}: not a checkpoint (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_bytes())
    except (ValueError, OSError, RecursionError) as err:  # JSON and Unicode errors are ValueErrors
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise BundleflowError(
            f"{path}: unreadable manifest ({reason}); the checkpoint is damaged, resume from "
            "an earlier one"
        ) from None
    if not isinstance(manifest, dict):
        raise BundleflowError(
            f"{path}: the manifest is not a JSON object; the checkpoint is damaged"
        )
    if manifest.get("format") != CHECKPOINT_FORMAT:
        raise BundleflowError(
            f"{path}: checkpoint format {manifest.get('format')!r}; this bundleflow reads "
            f"format {CHECKPOINT_FORMAT}"
        )
    files = manifest.get("files")
    step = manifest.get("step")
    if (
        not isinstance(files, dict)
        or not all(_SAFE_FILE.fullmatch(str(k)) and isinstance(v, str) for k, v in files.items())
        or not isinstance(step, int)
        or isinstance(step, bool)
        or not all(isinstance(manifest.get(k, {}), dict) for k in ("config", "extra"))
    ):
        raise BundleflowError(
            f"{path}: malformed manifest (needs 'step', 'files' of NAME.safetensors -> sha256, "
            "'config' and 'extra' objects); the checkpoint is damaged, resume from an earlier one"
        )
    manifest.setdefault("config", {})
    manifest.setdefault("extra", {})
    return manifest


def verify_checkpoint(directory: str | Path) -> dict:
    """Check the manifest and every file's sha256; return the manifest."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    for filename, expected in manifest["files"].items():
        path = directory / filename
        if not path.is_file():
            raise BundleflowError(f"{path}: missing from the checkpoint")
        try:
            actual = file_sha256(path)
        except OSError as err:
            raise BundleflowError(f"{path}: cannot read ({err.strerror})") from None
        if actual != expected:
            raise BundleflowError(f"{path}: checksum mismatch; the checkpoint is damaged")
    return manifest


def _fallback(directory: Path) -> Path:
    """``directory``, or the complete copy replace_checkpoint left beside it when it was
    interrupted between its two renames."""
    if directory.exists():
        return directory
    for side in (_staged(directory), _old(directory)):
        if (side / MANIFEST).is_file():
            logger.warning("{} is missing; using {} (an interrupted replacement)", directory, side)
            return side
    return directory


def read_checkpoint(
    directory: str | Path, *, device: str | torch.device = "cpu"
) -> tuple[dict[str, dict[str, Tensor]], dict]:
    """Verify every checksum, then load every component: ``(components, manifest)``.

    A damaged, incomplete or non-finite checkpoint is a :class:`BundleflowError`.
    """
    directory = _fallback(Path(directory))
    manifest = verify_checkpoint(directory)
    components = {}
    for filename in manifest["files"]:
        path = directory / filename
        try:
            components[filename.removesuffix(".safetensors")] = load_file(str(path), str(device))
        except (SafetensorError, OSError) as err:
            raise BundleflowError(f"{path}: unreadable ({err})") from None
    _check_finite(components, str(directory))
    return components, manifest


def clean_stale(parent: str | Path) -> None:
    """Remove temporary checkpoint directories left by writers that no longer run."""
    for tmp in Path(parent).glob(".*.tmp"):
        parts = tmp.name.split(".")
        pid = int(parts[-3]) if len(parts) >= 4 and parts[-3].isdigit() else None
        if pid is None or pid == os.getpid() or _alive(pid) or not tmp.is_dir():
            continue
        shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _has_manifest(directory: Path) -> bool:
    try:
        return (directory / MANIFEST).is_file()
    except OSError:  # unreadable: not a checkpoint we can use
        return False


def prune(parent: str | Path, keep: int, prefix: str = "step-") -> None:
    """Keep the ``keep`` newest ``prefix*`` checkpoints under ``parent``; remove leftovers of
    killed writers."""
    parent = Path(parent)
    found = sorted(p for p in parent.glob(f"{prefix}*") if _has_manifest(p))
    for old in found[: max(0, len(found) - keep)]:
        # Rename first: a kill during the removal leaves a hidden leftover, never a
        # half-deleted checkpoint under a checkpoint's name.
        doomed = old.with_name(f"{_temp_prefix(old.name)}del.tmp")
        try:
            os.rename(old, doomed)
        except OSError:
            continue
        shutil.rmtree(doomed, ignore_errors=True)
    clean_stale(parent)


def latest(parent: str | Path, prefix: str = "step-") -> Path | None:
    """The newest complete, verified checkpoint under ``parent`` (names sort by step).

    A damaged one (bad manifest, missing file, checksum mismatch) is skipped with a warning
    and the one before it is used.
    """
    found = sorted(p for p in Path(parent).glob(f"{prefix}*") if _has_manifest(p))
    for candidate in reversed(found):
        try:
            verify_checkpoint(candidate)
        except BundleflowError as err:
            logger.warning("skipping damaged checkpoint: {}", err)
            continue
        return candidate
    return None


def _staged(target: Path) -> Path:
    return target.with_name(f".{target.name}.new")


def _old(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


def replace_checkpoint(
    directory: str | Path, components: dict[str, dict[str, Tensor]], **kw: Any
) -> Path:
    """Write a checkpoint that replaces ``directory`` (e.g. ``best``) without a gap.

    The new one is written beside it, then the old one is moved away and the new one into
    place; if the process dies in between, the newest complete copy is still on disk, where
    :func:`read_checkpoint` finds it and the next replacement puts it back.
    """
    target = Path(directory)
    staged, old = _staged(target), _old(target)
    if not target.exists():  # a replacement was interrupted between its renames: repair
        for side in (staged, old):
            if (side / MANIFEST).is_file():
                os.rename(side, target)
                break
    for leftover in (staged, old):
        if leftover.exists():
            shutil.rmtree(leftover)
    write_checkpoint(staged, components, **kw)
    try:
        if target.exists():
            os.rename(target, old)
        os.rename(staged, target)
        fsync_dir(target.parent)
    except OSError as err:
        raise write_error(target, err) from None
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(old)
    return target


# --------------------------------------------------------------------------- optimizer state


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict]:
    """Split an optimizer's state dict into tensors and a JSON-able rest."""
    return flatten_optimizer_state(optimizer.state_dict())


def flatten_optimizer_state(state: dict) -> tuple[dict[str, Tensor], dict]:
    """An optimizer state dict as ``{"INDEX.KEY": tensor}`` plus a JSON-able rest."""
    tensors, scalars = {}, {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, Tensor):
                tensors[f"{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def regroup_optimizer_state(tensors: dict[str, Tensor], rest: dict) -> dict[int, dict]:
    """Inverse of :func:`flatten_optimizer_state` for the per-parameter ``state`` part."""
    state: dict[int, dict] = {}
    for name, value in [*tensors.items(), *rest.get("scalars", {}).items()]:
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return state


def load_optimizer_tensors(
    optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor], rest: dict
) -> None:
    state = regroup_optimizer_state(tensors, rest)
    optimizer.load_state_dict({"state": state, "param_groups": rest["param_groups"]})
