"""Valuation data on disk: our format, the reference ``.pt`` layout, CATS text files, a cache.

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

Every load is validated (:func:`validate_xor`); every problem a user can cause raises
:class:`~bundleflow.errors.BundleflowError` naming the file (and line, for text files)
and the fix.
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import json
import math
import os
import pickle
import shlex
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import torch
from loguru import logger
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from bundleflow import __version__
from bundleflow.atomic import atomic_open, atomic_path, file_sha256
from bundleflow.errors import BundleflowError
from bundleflow.paths import default_cache_dir
from bundleflow.valuations import cats

FORMAT_NAME = "bundleflow-valuations"
FORMAT_VERSION = 2  # 2: written by the safetensors library; 1 (still read): see above
# The cache key's version: what a cached file holds, which version 2 did not change. Keeping
# it keeps the names of the sets already cached (their version-1 files are read as they are).
_CACHE_KEY_VERSION = 1
TENSOR_NAME = "valuations"
METADATA_KEY = "bundleflow"
DEFAULT_SPLIT = (0.90, 0.05, 0.05)
# The reference data's split: first 95% training (validation carved from its end), last 5% test.
REFERENCE_TRAIN_FRACTION = 0.95
REFERENCE_VAL_FRACTION_OF_TRAIN = 0.05

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
ACCEPTED_FORMATS = (
    "bundleflow .safetensors, the reference tensor [N, K, m+1] in a torch .pt/.pth or a .zip "
    "holding one, CATS text output (.txt/.cats)"
)
_SNIFF_BYTES = 1 << 16
_CATS_HEADER_WORDS = ("goods", "bids", "dummy")


# ---------------------------------------------------------------------------------------
# Split


@dataclass(frozen=True)
class Split:
    """Contiguous train/val/test parts as half-open index ranges ``(start, stop)``."""

    train: tuple[int, int]
    val: tuple[int, int]
    test: tuple[int, int]
    origin: str
    """``"recorded"`` (from the file's metadata) or ``"reference"`` (the default split)."""
    fractions: tuple[float, float, float] | None = None

    def to_dict(self) -> dict:
        out: dict = {"ranges": {"train": list(self.train), "val": list(self.val)}}
        out["ranges"]["test"] = list(self.test)
        if self.fractions is not None:
            out["fractions"] = dict(zip(("train", "val", "test"), self.fractions, strict=True))
        return out

    def sizes(self) -> dict[str, int]:
        return {name: b - a for name, (a, b) in self._parts()}

    def _parts(self) -> list[tuple[str, tuple[int, int]]]:
        return [("train", self.train), ("val", self.val), ("test", self.test)]


def _round_half_up(x: float) -> int:
    # 1e-9 absorbs binary noise such as 0.05 * 20000 = 1000.0000000000001
    return int(math.floor(x + 0.5 + 1e-9))


def split_from_fractions(n: int, fractions: tuple[float, float, float] = DEFAULT_SPLIT) -> Split:
    """Train first, then validation, then test; sizes rounded, train takes the remainder."""
    check_split_fractions(fractions)
    n_val = _round_half_up(fractions[1] * n)
    n_test = _round_half_up(fractions[2] * n)
    n_train = n - n_val - n_test
    if n_train < 1:
        raise BundleflowError(
            f"split {fractions} leaves no training samples out of {n}; generate more samples "
            "(--n) or lower the validation/test fractions (--split)"
        )
    return Split(
        train=(0, n_train),
        val=(n_train, n_train + n_val),
        test=(n_train + n_val, n),
        origin="recorded",
        fractions=tuple(float(f) for f in fractions),
    )


def reference_split(n: int) -> Split:
    """First 95% training (its last 5% for validation), last 5% test."""
    n_trainval = int(math.floor(REFERENCE_TRAIN_FRACTION * n + 1e-9))
    n_val = int(math.floor(REFERENCE_VAL_FRACTION_OF_TRAIN * n_trainval + 1e-9))
    return Split(
        train=(0, n_trainval - n_val),
        val=(n_trainval - n_val, n_trainval),
        test=(n_trainval, n),
        origin="reference",
    )


def check_split_fractions(fractions: tuple[float, ...]) -> None:
    if (
        len(fractions) != 3
        or any(not math.isfinite(f) or f < 0 for f in fractions)
        or abs(sum(fractions) - 1.0) > 1e-6
        or fractions[0] <= 0
    ):
        raise BundleflowError(
            f"split fractions {tuple(fractions)} must be three numbers TRAIN,VAL,TEST ≥ 0 "
            "summing to 1 with TRAIN > 0, e.g. --split 0.90,0.05,0.05"
        )


def _split_from_metadata(meta: dict, n: int, source: str) -> Split:
    try:
        ranges = meta["ranges"]
        parts = [tuple(int(v) for v in ranges[name]) for name in ("train", "val", "test")]
        fractions = meta.get("fractions")
        fr = (
            None
            if fractions is None
            else tuple(float(fractions[k]) for k in ("train", "val", "test"))
        )
    except (KeyError, TypeError, ValueError) as err:
        raise BundleflowError(
            f"{source}: the split in the metadata is malformed ({err!r}); re-create the file "
            "with `bundleflow data convert` or `bundleflow data generate`"
        ) from None
    (a0, a1), (b0, b1), (c0, c1) = parts
    if not (a0 == 0 and a1 == b0 and b1 == c0 and c1 == n and a0 < a1 <= b1 <= c1):
        raise BundleflowError(
            f"{source}: the recorded split {parts} does not cover the {n} samples in order; "
            "re-create the file with `bundleflow data convert`"
        )
    return Split(train=parts[0], val=parts[1], test=parts[2], origin="recorded", fractions=fr)


# ---------------------------------------------------------------------------------------
# Validation


def _first_index(mask: Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in mask.nonzero()[0])


def validate_xor(tensor: object, source: str | os.PathLike, n_items: int | None = None) -> Tensor:
    """Check XOR valuations ``[N, K, m+1]`` and return them as contiguous float32 on the CPU.

    Raises :class:`BundleflowError` naming ``source`` for: not a tensor, wrong rank or
    shape, an empty set, m different from ``n_items``, NaN/inf, bundle columns other than
    0/1, negative values, a value on an empty bundle, a valuation without any atom.
    """
    where = str(source)
    layout = "the reference layout is a tensor [N, K, m+1]: 0/1 item columns, value last"
    if not isinstance(tensor, Tensor):
        raise BundleflowError(
            f"{where}: expected a tensor, found {type(tensor).__name__}; {layout}"
        )
    if tensor.is_complex() or tensor.dtype == torch.bool:
        raise BundleflowError(f"{where}: unsupported dtype {tensor.dtype}; {layout}")
    if tensor.dim() != 3:
        raise BundleflowError(
            f"{where}: expected rank 3 [N, K, m+1], found shape {tuple(tensor.shape)}; {layout}"
        )
    n, k, width = tensor.shape
    if n == 0:
        raise BundleflowError(f"{where}: the data set is empty (0 valuations); {layout}")
    if k == 0 or width < 2:
        raise BundleflowError(
            f"{where}: shape {tuple(tensor.shape)} has no room for atoms (need K ≥ 1 and "
            f"m+1 ≥ 2); {layout}"
        )
    if n_items is not None and width - 1 != n_items:
        raise BundleflowError(
            f"{where}: the data has m={width - 1} items but this run uses m={n_items}; use "
            f"data with {n_items} items (`bundleflow data generate --items {n_items}`) or set "
            f"the run's number of items to {width - 1}"
        )
    t = tensor.detach().to("cpu", torch.float32).contiguous()
    finite = torch.isfinite(t)
    if not bool(finite.all()):
        i, j, c = _first_index(~finite)
        raise BundleflowError(
            f"{where}: non-finite number {float(t[i, j, c])} at valuation {i}, atom {j}, "
            f"column {c}; fix or drop that valuation"
        )
    items, values = t[..., :-1], t[..., -1]
    not_binary = (items != 0) & (items != 1)
    if bool(not_binary.any()):
        i, j, c = _first_index(not_binary)
        raise BundleflowError(
            f"{where}: bundle column {c} of valuation {i}, atom {j} is {float(items[i, j, c])}; "
            "item columns must be 0 or 1 (is the value column last?)"
        )
    if bool((values < 0).any()):
        i, j = _first_index(values < 0)
        raise BundleflowError(
            f"{where}: negative value {float(values[i, j])} at valuation {i}, atom {j}; "
            "values must be ≥ 0"
        )
    is_atom = items.sum(-1) > 0
    empty_with_value = ~is_atom & (values != 0)
    if bool(empty_with_value.any()):
        i, j = _first_index(empty_with_value)
        raise BundleflowError(
            f"{where}: valuation {i}, atom {j} has value {float(values[i, j])} on an empty "
            "bundle; padding rows must be all zero"
        )
    no_atoms = ~is_atom.any(-1)
    if bool(no_atoms.any()):
        (i,) = _first_index(no_atoms)
        raise BundleflowError(
            f"{where}: valuation {i} has no atoms (every row is zero padding); drop it or "
            "check that the file holds XOR valuations"
        )
    return t


# ---------------------------------------------------------------------------------------
# Safetensors, through the safetensors library


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


def _read_safetensors(path: Path, source: str) -> tuple[Tensor, dict | None]:
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


def _read_torch(f: BinaryIO | str | os.PathLike, source: str) -> Tensor:
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


def _read_zip(path: Path, source: str) -> tuple[Tensor, dict | None]:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if _is_torch_archive(names):  # a torch.save file (itself a zip)
                return _read_torch(path, source), None
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
            return _read_safetensors(inner_path, inner_source)
    return _read_torch(io.BytesIO(data), inner_source), None


# ---------------------------------------------------------------------------------------
# CATS text files


@dataclass(frozen=True)
class CatsText:
    """A parsed CATS output file. ``bidders[b]`` is a list of (value, goods) in file order,
    dummy goods removed; bids sharing a dummy good are one bidder (an XOR group)."""

    goods: int
    bids: int
    dummy: int
    bid_lines: int
    bidders: list[list[tuple[float, tuple[int, ...]]]] = field(repr=False)

    def to_tensor(self) -> Tensor:
        """``[bidders, max atoms, goods + 1]`` float32, zero rows pad."""
        k = max(len(b) for b in self.bidders)
        out = torch.zeros(len(self.bidders), k, self.goods + 1)
        for i, bidder in enumerate(self.bidders):
            for j, (value, goods) in enumerate(bidder):
                out[i, j, list(goods)] = 1.0
                out[i, j, -1] = value
        return out


def read_cats_text(path: str | os.PathLike) -> CatsText:
    """Parse a CATS output file (format in ``shared/spec/cats.md``); errors name the line."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise BundleflowError(
            f"{path}: not a text file, so not CATS text output; accepted: {ACCEPTED_FORMATS}"
        ) from None
    except OSError as err:
        raise BundleflowError(f"{path}: cannot read ({err.strerror})") from None
    header: dict[str, int] = {}
    groups: dict[int, int] = {}  # dummy good -> bidder index
    bidders: list[list[tuple[float, tuple[int, ...]]]] = []
    bid_lines = 0
    last_line = 0
    for lineno, line in enumerate(text.splitlines(), start=1):
        last_line = lineno
        stripped = line.strip()
        if not stripped or stripped.startswith("%"):
            continue
        tokens = stripped.split()
        where = f"{path}:{lineno}"
        if tokens[0] in ("goods", "bids", "dummy"):
            if bid_lines:
                raise BundleflowError(f"{where}: header line {tokens[0]!r} after the first bid")
            if len(tokens) != 2 or not tokens[1].isdigit():
                raise BundleflowError(
                    f"{where}: malformed header line {stripped!r}; expected '{tokens[0]} <count>'"
                )
            header[tokens[0]] = int(tokens[1])
            continue
        if "goods" not in header or "bids" not in header:
            raise BundleflowError(
                f"{where}: {stripped[:40]!r} before the 'goods G' and 'bids N' header lines; "
                "is this a CATS output file?"
            )
        goods, n_dummy = header["goods"], header.get("dummy", 0)
        if tokens[-1] != "#":
            raise BundleflowError(
                f"{where}: a bid line must end with '#' (the file may be truncated); "
                "expected 'bid_id amount good good ... #'"
            )
        if len(tokens) < 4:
            raise BundleflowError(f"{where}: a bid needs an id, an amount and at least one good")
        try:
            bid_id = int(tokens[0])
            amount = float(tokens[1])
            items = [int(tok) for tok in tokens[2:-1]]
        except ValueError:
            raise BundleflowError(
                f"{where}: non-numeric field in {stripped[:60]!r}; expected "
                "'bid_id amount good good ... #'"
            ) from None
        if bid_id != bid_lines:
            raise BundleflowError(
                f"{where}: bid id {bid_id}, expected {bid_lines} (ids count from 0)"
            )
        if not math.isfinite(amount) or amount < 0:
            raise BundleflowError(f"{where}: bid amount {tokens[1]} must be a finite number ≥ 0")
        bad = [g for g in items if g < 0 or g >= goods + n_dummy]
        if bad:
            raise BundleflowError(
                f"{where}: good {bad[0]} out of range; goods are 0..{goods - 1} and dummy goods "
                f"{goods}..{goods + n_dummy - 1}"
            )
        if len(set(items)) != len(items):
            raise BundleflowError(f"{where}: a good appears twice in one bid")
        real = tuple(g for g in items if g < goods)
        dummies = [g for g in items if g >= goods]
        if not real:
            raise BundleflowError(f"{where}: the bid has no real goods (only dummy goods)")
        if len(dummies) > 1:
            raise BundleflowError(f"{where}: the bid has {len(dummies)} dummy goods; CATS uses one")
        if dummies:
            index = groups.setdefault(dummies[0], len(bidders))
            if index == len(bidders):
                bidders.append([])
        else:
            index = len(bidders)
            bidders.append([])
        bidders[index].append((amount, real))
        bid_lines += 1
    missing = [k for k in ("goods", "bids") if k not in header]
    if missing:
        raise BundleflowError(
            f"{path}: no {' / '.join(missing)} header line"
            + (" (the file is empty)" if not text.strip() else "")
            + "; expected a CATS output file with 'goods G', 'bids N', 'dummy D' and bid lines"
        )
    if bid_lines != header["bids"]:
        raise BundleflowError(
            f"{path}:{last_line}: the header announces {header['bids']} bids but the file has "
            f"{bid_lines} bid lines"
            + (" (truncated?)" if bid_lines < header["bids"] else "")
            + "; regenerate the file with CATS"
        )
    if not bidders:
        raise BundleflowError(f"{path}: the file has no bids")
    return CatsText(
        goods=header["goods"],
        bids=header["bids"],
        dummy=header.get("dummy", 0),
        bid_lines=bid_lines,
        bidders=bidders,
    )


# ---------------------------------------------------------------------------------------
# Loading any supported file


@dataclass(frozen=True)
class Dataset:
    """Validated valuations with their metadata and split."""

    valuations: Tensor
    """``[N, K, m+1]`` float32 on the CPU."""
    metadata: dict
    split: Split
    path: Path

    @property
    def n_items(self) -> int:
        return self.valuations.shape[2] - 1

    def part(self, name: str) -> Tensor:
        """``"train"``, ``"val"`` or ``"test"`` valuations."""
        start, stop = getattr(self.split, name)
        return self.valuations[start:stop]


def _looks_like_cats_text(head: bytes, whole: bool) -> bool:
    """The first line that is neither blank nor a ``%`` comment starts with a header word."""
    lines = head.decode("utf-8", errors="replace").splitlines()
    if not whole:
        lines = lines[:-1]  # the last line may be cut
    for line in lines:
        tokens = line.split()
        if tokens and not tokens[0].startswith("%"):
            return tokens[0] in _CATS_HEADER_WORDS
    return head.lstrip().startswith(b"%")  # nothing but comments yet: a long CATS preamble


def _sniff(path: Path) -> str:
    """The reader for a file: by suffix, else by content; ``"unknown"`` for anything else
    (a CSV must not reach the CATS parser and come back as a parse error on line 1)."""
    suffix = path.suffix.lower()
    known = {".safetensors": "safetensors", ".pt": "torch", ".pth": "torch", ".zip": "zip"}
    if suffix in known:
        return known[suffix]
    if suffix in (".txt", ".cats"):
        return "text"
    with path.open("rb") as f:
        head = f.read(_SNIFF_BYTES)
    if head[:2] == b"PK":
        return "zip"
    if head[:1] == b"\x80":  # a legacy (non-zip) torch pickle
        return "torch"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if _looks_like_cats_text(head, whole=len(head) < _SNIFF_BYTES):
        return "text"
    return "unknown"


def read_valuations(path: str | os.PathLike) -> tuple[Tensor, dict | None]:
    """Raw read of any supported file: the tensor (not yet validated) and its metadata."""
    path = Path(path)
    source = str(path)
    if not path.exists():
        raise BundleflowError(f"{source}: no such file; check the path")
    if path.is_dir():
        raise BundleflowError(f"{source}: is a directory; pass a data file")
    size = path.stat().st_size
    if size == 0:
        raise BundleflowError(f"{source}: the file is empty; regenerate or re-download it")
    kind = _sniff(path)
    if kind == "unknown":
        raise BundleflowError(
            f"{source}: not a recognised data file ({path.suffix or 'no suffix'}); accepted: "
            f"{ACCEPTED_FORMATS}. Other data (e.g. CSV): torch.save the tensor [N, K, m+1] (0/1 "
            "item columns, value last) as FILE.pt, then pass it or `bundleflow data convert "
            "FILE.pt FILE.safetensors`"
        )
    if kind == "safetensors":
        return _read_safetensors(path, source)
    if kind == "torch":
        return _read_torch(path, source), None
    if kind == "zip":
        return _read_zip(path, source)
    parsed = read_cats_text(path)
    meta = {
        "source": {
            "format": "cats-text",
            "goods": parsed.goods,
            "bids": parsed.bids,
            "dummy": parsed.dummy,
            "bidders": len(parsed.bidders),
        }
    }
    return parsed.to_tensor(), meta


def load_dataset(path: str | os.PathLike, n_items: int | None = None) -> Dataset:
    """Read, validate and split a data set (ours, reference ``.pt``/zip, or CATS text).

    A file without split metadata gets :func:`reference_split`.
    """
    path = Path(path)
    tensor, meta = read_valuations(path)
    valuations = validate_xor(tensor, path, n_items=n_items)
    meta = meta or {}
    if "split" in meta:
        split = _split_from_metadata(meta["split"], valuations.shape[0], str(path))
    else:
        split = reference_split(valuations.shape[0])
    return Dataset(valuations=valuations, metadata=meta, split=split, path=path)


def convert(src: str | os.PathLike, dst: str | os.PathLike) -> Dataset:
    """Read any supported file and write it as ``.safetensors`` (with split) or ``.pt``."""
    data = load_dataset(src)
    meta = {k: v for k, v in data.metadata.items() if k not in ("sha256", "shape", "dtype")}
    meta["split"] = data.split.to_dict()
    meta.setdefault("converted_from", {"file": Path(src).name, "sha256": file_sha256(src)})
    save_dataset(dst, data.valuations, meta)
    return data


# ---------------------------------------------------------------------------------------
# Generated sets: metadata, regeneration command, cache


def generator_settings(
    dist: str,
    n_items: int,
    n: int,
    seed: int,
    *,
    params: cats.CatsParams | None = None,
    private_values: str = "upv",
    mode: str = "fresh",
) -> dict:
    """Everything that determines the generated numbers (the cache key is its hash)."""
    params = params or cats.CatsParams()
    return {
        "name": "cats",
        "algorithm_version": cats.ALGORITHM_VERSION,
        "dist": dist,
        "values": private_values,
        "mode": mode,
        "n_items": n_items,
        "n": n,
        "seed": seed,
        "params": params.to_dict(),
    }


def regenerate_command(settings: dict, split: tuple[float, float, float]) -> str:
    """The `bundleflow data generate` command that reproduces a set (defaults omitted).

    The output name is left as ``FILE`` so that the file's bytes do not depend on its name.
    """
    args = [
        "bundleflow", "data", "generate",
        "--dist", settings["dist"], "--items", str(settings["n_items"]),
        "--n", str(settings["n"]), "--seed", str(settings["seed"]),
        "--values", settings["values"], "--mode", settings["mode"],
    ]  # fmt: skip
    defaults = cats.CatsParams().to_dict()
    for key, value in settings["params"].items():
        if value != defaults[key]:
            args += ["--" + key.replace("_", "-"), repr(value)]
    if tuple(split) != DEFAULT_SPLIT:
        args += ["--split", ",".join(repr(f) for f in split)]
    return shlex.join([*args, "--out", "FILE"])


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


def generate_dataset(
    out: str | os.PathLike,
    dist: str,
    n_items: int,
    n: int,
    seed: int,
    *,
    params: cats.CatsParams | None = None,
    private_values: str = "upv",
    mode: str = "fresh",
    split: tuple[float, float, float] = DEFAULT_SPLIT,
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Generate a CATS set and save it (atomically) with settings, seed, split, checksum."""
    out = safetensors_output(
        out,
        "settings",
        ", then `bundleflow data convert` it to .pt if you need the bare tensor",
    )
    settings = generator_settings(
        dist, n_items, n, seed, params=params, private_values=private_values, mode=mode
    )
    parts = split_from_fractions(n, split)  # fail on a bad split before generating
    valuations = cats.generate(
        dist,
        n_items,
        n,
        seed,
        params=params,
        private_values=private_values,
        mode=mode,
        workers=workers,
        progress=progress,
    )
    meta = {
        "generator": settings,
        "split": parts.to_dict(),
        "units": "CATS value units (no normalisation)",
        "bundleflow_version": __version__,
        "regenerate": regenerate_command(settings, split),
    }
    return save_dataset(out, valuations, meta)


def cache_key(settings: dict, split: tuple[float, float, float]) -> str:
    blob = {"settings": settings, "split": list(split), "format_version": _CACHE_KEY_VERSION}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def cached_dataset(
    dist: str,
    n_items: int,
    n: int,
    seed: int,
    *,
    params: cats.CatsParams | None = None,
    private_values: str = "upv",
    mode: str = "fresh",
    split: tuple[float, float, float] = DEFAULT_SPLIT,
    cache_dir: str | os.PathLike | None = None,
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Path of the generated set for these settings and seed, generating it on first use.

    Files live under ``<cache>/data/`` named by a hash of settings, seed and split, so a
    training preset can name a set by its settings and the job needs no download. A cached
    file that fails its checksum is regenerated.
    """
    settings = generator_settings(
        dist, n_items, n, seed, params=params, private_values=private_values, mode=mode
    )
    key = cache_key(settings, split)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    name = f"cats-{dist}-{private_values}-{mode}-m{n_items}-n{n}-seed{seed}-{key[:16]}"
    path = root / "data" / f"{name}.safetensors"
    if path.exists():
        try:
            load_dataset(path, n_items=n_items)
            logger.debug("cached data set {}", path)
            return path
        except BundleflowError as err:
            logger.warning("cached data set unusable, regenerating it: {}", err)
    else:
        logger.info("generating data set {} (cached for later runs)", path)
    return generate_dataset(
        path,
        dist,
        n_items,
        n,
        seed,
        params=params,
        private_values=private_values,
        mode=mode,
        split=split,
        workers=workers,
        progress=progress,
    )
