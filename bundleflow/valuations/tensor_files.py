"""Tensor files: our ``.safetensors`` format (writer and reader), the reference ``.pt`` layout
and the zip it is published in.

Our format is a safetensors file holding one float32 tensor ``valuations`` ``[N, K, m+1]``
and, under the metadata key ``bundleflow``, a JSON object: format and version, shape,
the sha256 of the tensor bytes (the file's data section: C order, little-endian float32),
the generator settings and seed (enough to regenerate the set bit for bit) and the
train/val/test split. Files are written atomically (temporary file, fsync, rename): a
reader sees the old file or the new one, never half of one.

Files are written and read with the safetensors library. Format version 2 (this writer)
and version 1 (bundleflow's own writer before it; still read) hold the same metadata and the
same data bytes; they differ only in the order of the keys of the tensor's header entry
(the library writes ``dtype, shape, data_offsets``, version 1 sorted them), so a set
regenerated now has another file sha256 but the same recorded tensor sha256.

The readers return the raw tensor (and our metadata); :mod:`bundleflow.valuations.dataset`
validates it.
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import json
import os
import pickle
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from bundleflow.atomic import atomic_open, atomic_path
from bundleflow.errors import BundleflowError
from bundleflow.valuations.validate import validate_xor

FORMAT_NAME = "bundleflow-valuations"
FORMAT_VERSION = 2  # 2: written by the safetensors library; 1 (still read): see above
TENSOR_NAME = "valuations"
METADATA_KEY = "bundleflow"

# What a data file's tensor may be stored as (it is read as float32); the library knows more.
_ACCEPTED_DTYPES = ("F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL")
# The safetensors library's complaints about a damaged file (a phrase of its message) and
# what we tell the user instead; the first match wins.
_SAFETENSORS_REASONS = (
    ("header too small", "shorter than a safetensors header (8 bytes)"),
    ("invalid header length", "truncated: the safetensors header runs past the end of the file"),
    ("header too large", "the safetensors header claims more than 100 MB"),
    ("not fully covered", "truncated or padded: the data section does not match the header"),
    ("invalid json", "unreadable safetensors header ({message})"),
    ("offset", "tensor offsets do not match its shape"),
)  # fmt: skip
# What the loader reads, as error messages list it.
ACCEPTED_FORMATS = (
    "bundleflow .safetensors, the reference tensor [N, K, m+1] in a torch .pt/.pth or a .zip "
    "holding one, CATS text output (.txt/.cats)"
)


def _tensor_buffer(t: Tensor) -> ctypes.Array:
    """A zero-copy buffer over a contiguous CPU tensor's bytes; keep ``t`` alive meanwhile."""
    if sys.byteorder != "little":  # safetensors is little-endian
        raise BundleflowError("writing data sets is only supported on little-endian machines")
    nbytes = t.numel() * t.element_size()
    return (ctypes.c_char * nbytes).from_address(t.data_ptr())


def tensor_sha256(t: Tensor) -> str:
    """sha256 of a tensor's bytes as stored (contiguous, little-endian)."""
    t = t.contiguous()
    return hashlib.sha256(_tensor_buffer(t)).hexdigest()


def _atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write via a temporary file in the same directory, fsync, then rename over ``path``.

    ``torch.save`` reports a failed write (full disk, file-size limit) as a RuntimeError from
    its zip writer ("[enforce fail at inline_container.cc] ... file write failed" or
    "unexpected pos"), not an OSError: that becomes a user error too."""
    try:
        with atomic_open(path) as f:
            write(f)
    except RuntimeError as err:
        if "inline_container" not in str(err):
            raise
        raise BundleflowError(
            f"{path}: cannot write (torch.save: file write failed); free disk space or raise "
            "the file-size limit (`ulimit -f`)"
        ) from err


def save_dataset(path: str | os.PathLike, valuations: Tensor, metadata: dict) -> Path:
    """Write ``[N, K, m+1]`` valuations atomically.

    ``.safetensors``: our format, with ``metadata`` plus format, shape and sha256 added.
    ``.pt``: the reference layout, the bare tensor only (``torch.save``); metadata is lost.
    """
    path = Path(path)
    t = validate_xor(valuations, path)
    suffix = path.suffix.lower()
    if suffix == ".pt":
        _atomic_write(path, lambda f: torch.save(t, f))
        return path
    if suffix != ".safetensors":
        raise BundleflowError(
            f"{path}: unknown output format {suffix or '(no suffix)'}; name the file "
            "*.safetensors (bundleflow format, keeps settings and split) or *.pt (bare tensor)"
        )
    meta = dict(metadata)
    meta.update(
        format=FORMAT_NAME,
        format_version=FORMAT_VERSION,
        shape=list(t.shape),
        dtype="float32",
        sha256=tensor_sha256(t),
    )
    header = {METADATA_KEY: json.dumps(meta, sort_keys=True)}
    with atomic_path(path) as tmp:  # a failed write (full disk) becomes one clear error
        save_file({TENSOR_NAME: t}, str(tmp), metadata=header)
    return path


def _library_reason(err: Exception) -> str:
    """The safetensors library's complaint about a file, in our words where we have them."""
    message = (str(err).splitlines() or [type(err).__name__])[0]
    lowered = message.lower()
    for phrase, reason in _SAFETENSORS_REASONS:
        if phrase in lowered:
            return reason.format(message=message.removeprefix("Error while deserializing header: "))
    return f"not a readable safetensors file ({message})"


def read_safetensors(path: Path, source: str) -> tuple[Tensor, dict | None]:
    """The valuations tensor of a safetensors file (ours or any other) and our metadata."""
    fix = "the file is truncated or corrupt; regenerate or re-download it"
    try:
        with safe_open(str(path), framework="pt") as f:
            raw_meta = f.metadata() or {}
            names = list(f.keys())
            if TENSOR_NAME in names:
                name = TENSOR_NAME
            elif len(names) == 1:
                name = names[0]
            else:
                raise BundleflowError(
                    f"{source}: expected one tensor named {TENSOR_NAME!r}, found {sorted(names)}; "
                    f"save the valuations as {TENSOR_NAME!r}"
                )
            dtype = f.get_slice(name).get_dtype()
            if dtype not in _ACCEPTED_DTYPES:
                raise BundleflowError(
                    f"{source}: tensor {name!r} has the unsupported dtype {dtype}; save the "
                    "valuations as float32"
                )
            # A copy in memory, not the library's mapping of the file: a data file replaced in
            # place (cp over it) during a run would otherwise kill the run with SIGBUS.
            tensor = f.get_tensor(name).clone()
    except SafetensorError as err:
        raise BundleflowError(f"{source}: {_library_reason(err)}; {fix}") from None
    meta = None
    if METADATA_KEY in raw_meta:
        try:
            meta = json.loads(raw_meta[METADATA_KEY])
        except (TypeError, ValueError, RecursionError) as err:
            raise BundleflowError(
                f"{source}: unreadable bundleflow metadata ({err}); {fix}"
            ) from None
        if not isinstance(meta, dict):
            raise BundleflowError(f"{source}: the bundleflow metadata is not an object; {fix}")
    recorded = meta.get("sha256") if meta is not None else None
    if recorded:
        digest = tensor_sha256(tensor)  # the data section's bytes, as the writer hashed them
        if recorded != digest:
            regenerate = meta.get("regenerate")
            raise BundleflowError(
                f"{source}: checksum mismatch (the data is corrupt: sha256 {digest[:12]}… "
                f"≠ recorded {str(recorded)[:12]!r}…); regenerate it"
                + (f" with `{regenerate}`" if isinstance(regenerate, str) and regenerate else "")
            )
    shape = list(tensor.shape)
    if meta is not None and "shape" in meta and meta["shape"] != shape:
        raise BundleflowError(
            f"{source}: metadata shape {meta['shape']} ≠ tensor shape {shape}; {fix}"
        )
    return tensor, meta


# ---------------------------------------------------------------------------------------
# The reference .pt layout and the zip it is published in


def _unwrap_loaded(obj: object, source: str) -> Tensor:
    if isinstance(obj, Tensor):
        return obj
    if isinstance(obj, dict):
        tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor) and v.dim() == 3}
        if len(tensors) == 1:
            return next(iter(tensors.values()))
        raise BundleflowError(
            f"{source}: a dict with keys {sorted(map(str, obj))[:10]}, expected one tensor "
            "[N, K, m+1]; save the tensor alone with torch.save(tensor, path)"
        )
    if isinstance(obj, list | tuple) and len(obj) == 1 and isinstance(obj[0], Tensor):
        return obj[0]
    raise BundleflowError(
        f"{source}: holds a {type(obj).__name__}, expected a tensor [N, K, m+1]; save the "
        "tensor alone with torch.save(tensor, path)"
    )


def read_torch(f: BinaryIO | str | os.PathLike, source: str) -> Tensor:
    """The tensor of a ``torch.save`` file, loaded without unpickling code (weights only)."""
    try:
        obj = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" in str(err).lower() or "weights_only" in str(err).lower():
            raise BundleflowError(
                f"{source}: loading it would need pickled Python code, which bundleflow refuses "
                "(a pickle can run arbitrary code); re-save only the tensor "
                "(torch.save(tensor, path)) or convert it on a trusted machine with "
                "`bundleflow data convert`"
            ) from None
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise BundleflowError(
            f"{source}: not a readable torch file ({message}); re-download it"
        ) from None
    except Exception as err:  # noqa: BLE001 - damaged bytes make the unpickler raise anything
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise BundleflowError(
            f"{source}: not a readable torch file, truncated or corrupt ({message}); "
            "re-download or regenerate it"
        ) from None
    return _unwrap_loaded(obj, source)


def _is_torch_archive(names: list[str]) -> bool:
    return any(n.endswith("/data.pkl") or n == "data.pkl" for n in names)


def read_zip(path: Path, source: str) -> tuple[Tensor, dict | None]:
    """A zip that is a ``torch.save`` file, or one holding exactly one .pt or .safetensors."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if _is_torch_archive(names):  # a torch.save file (itself a zip)
                return read_torch(path, source), None
            inner = [
                n
                for n in names
                if n.lower().endswith((".pt", ".pth", ".safetensors")) and "__MACOSX" not in n
            ]
            if len(inner) != 1:
                raise BundleflowError(
                    f"{source}: expected exactly one .pt or .safetensors file in the zip, found "
                    f"{inner or 'none'}; unzip it and pass the data file itself"
                )
            data = archive.read(inner[0])
    except BundleflowError:
        raise
    except Exception as err:  # noqa: BLE001 - a damaged zip raises BadZipFile, zlib.error,
        # UnicodeDecodeError (names), NotImplementedError (compression), EOFError, ...
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise BundleflowError(
            f"{source}: not a readable zip, truncated or corrupt ({message}); re-download it"
        ) from None
    inner_source = f"{source}:{inner[0]}"
    if not data:
        raise BundleflowError(f"{inner_source}: the file is empty; re-download the zip")
    if inner[0].lower().endswith(".safetensors"):
        with tempfile.TemporaryDirectory(prefix="bundleflow-") as tmp:  # the library reads files
            inner_path = Path(tmp) / "data.safetensors"
            inner_path.write_bytes(data)
            return read_safetensors(inner_path, inner_source)
    return read_torch(io.BytesIO(data), inner_source), None


def safetensors_output(out: str | os.PathLike, keeps: str, then: str = "") -> Path:
    """``out`` as a Path if it names a ``.safetensors`` file (what generated sets are saved
    as, so that they keep their ``keeps``, seed and split); a user error otherwise."""
    out = Path(out)
    if out.suffix.lower() != ".safetensors":
        raise BundleflowError(
            f"{out}: generated sets are saved as .safetensors (so they keep their {keeps}, "
            f"seed and split); name the output *.safetensors{then}"
        )
    return out
