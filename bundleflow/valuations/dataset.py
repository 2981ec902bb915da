"""A data set: any supported file read, validated and split.

Readers are chosen by suffix, else by content: our ``.safetensors`` and the reference ``.pt``
or zip (:mod:`bundleflow.valuations.tensor_files`), CATS text output
(:mod:`bundleflow.valuations.cats_text`). Every load is validated (:func:`validate_xor`);
every problem a user can cause raises :class:`~bundleflow.errors.BundleflowError` naming
the file (and line, for text files) and the fix.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from bundleflow.atomic import file_sha256
from bundleflow.errors import BundleflowError
from bundleflow.valuations.cats_text import looks_like_cats_text, read_cats_text
from bundleflow.valuations.split import Split, reference_split, split_from_metadata
from bundleflow.valuations.tensor_files import (
    ACCEPTED_FORMATS,
    read_safetensors,
    read_torch,
    read_zip,
    save_dataset,
)
from bundleflow.valuations.validate import validate_xor

_SNIFF_BYTES = 1 << 16


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
    if looks_like_cats_text(head, whole=len(head) < _SNIFF_BYTES):
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
        return read_safetensors(path, source)
    if kind == "torch":
        return read_torch(path, source), None
    if kind == "zip":
        return read_zip(path, source)
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
        split = split_from_metadata(meta["split"], valuations.shape[0], str(path))
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
