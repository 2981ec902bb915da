"""Atomic file writes: a temp file in the same directory, fsync, rename, fsync the directory.

A reader sees the old file or the complete new one, never a partial write. A write that
fails (full disk, file-size limit, read-only or unwritable directory) removes its temporary
file and raises one :class:`~bundleflow.errors.BundleflowError` naming the file and the fix.
The file checksum that data sets and checkpoints record (:func:`file_sha256`) lives here too.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from safetensors import SafetensorError

from bundleflow.errors import BundleflowError

_FULL = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}
_DENIED = {errno.EACCES, errno.EPERM, errno.EROFS}
_READ_BLOCK = 1 << 22


def write_error(path: str | Path, err: BaseException) -> BundleflowError:
    """The one-line user error for a failed write of ``path`` (``err``: OSError or a
    safetensors I/O error)."""
    code = getattr(err, "errno", None)
    if code is None:  # safetensors wraps the OS error in its message: "... (os error 28)"
        found = re.search(r"os error (\d+)", str(err))
        code = int(found.group(1)) if found else None
    reason = os.strerror(code) if code else (str(err).splitlines() or [type(err).__name__])[0]
    if code in _FULL:
        fix = (
            "free disk space (or raise the file-size limit, `ulimit -f`), then resume the run "
            "with --resume; the last complete checkpoint is intact"
        )
    elif code in _DENIED:
        fix = "make the directory writable or pass a writable --runs-dir"
    else:
        fix = "check the disk and the directory's permissions"
    return BundleflowError(f"{path}: cannot write ({reason}); {fix}")


def is_write_failure(err: BaseException) -> bool:
    """An OSError, or a safetensors error that wraps one (not a bad tensor)."""
    return isinstance(err, OSError) or (
        isinstance(err, SafetensorError) and "I/O error" in str(err)
    )


def file_mode() -> int:
    """0o666 less the process umask: what ``open()`` would have created (mkstemp uses 0o600)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # no /proc: read it the old way
    os.umask(mask)
    return 0o666 & ~mask


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable; filesystems that cannot fsync a directory are skipped."""
    try:
        dir_fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically.

    On an exception the temporary file is removed and ``path`` is untouched; a failed write
    (OSError, or a safetensors I/O error) becomes a :class:`BundleflowError`.
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
    except OSError as err:
        raise write_error(target, err) from None
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except (OSError, SafetensorError) as err:
        if is_write_failure(err):
            raise write_error(target, err) from None
        raise
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


@contextlib.contextmanager
def atomic_open(path: str | Path) -> Iterator[BinaryIO]:
    """An open binary file whose contents replace ``path`` atomically when the block ends."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        yield handle


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in 4 MiB blocks (data sets can be many GB)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(_READ_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()
