"""CATS text output files (format in ``shared/spec/cats.md``): a parser whose errors name the line.

A file has header lines ``goods G``, ``bids N`` and ``dummy D``, then one line per bid:
``bid_id amount good good ... #``. Bids that share a dummy good are one bidder's XOR group;
a bid without a dummy good is a bidder of its own.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from bundleflow.errors import BundleflowError
from bundleflow.valuations.tensor_files import ACCEPTED_FORMATS

_CATS_HEADER_WORDS = ("goods", "bids", "dummy")


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
    text = _read_text(path)
    reader = _Reader(path)
    last_line = 0
    for lineno, line in enumerate(text.splitlines(), start=1):
        last_line = lineno
        reader.line(lineno, line)
    return reader.result(text, last_line)


def looks_like_cats_text(head: bytes, whole: bool) -> bool:
    """The first line that is neither blank nor a ``%`` comment starts with a header word."""
    lines = head.decode("utf-8", errors="replace").splitlines()
    if not whole:
        lines = lines[:-1]  # the last line may be cut
    for line in lines:
        tokens = line.split()
        if tokens and not tokens[0].startswith("%"):
            return tokens[0] in _CATS_HEADER_WORDS
    return head.lstrip().startswith(b"%")  # nothing but comments yet: a long CATS preamble


def _read_text(path: Path) -> str:
    """The file as UTF-8 text; binary or unreadable files are user errors."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise BundleflowError(
            f"{path}: not a text file, so not CATS text output; accepted: {ACCEPTED_FORMATS}"
        ) from None
    except OSError as err:
        raise BundleflowError(f"{path}: cannot read ({err.strerror})") from None


class _Reader:
    """One pass over a CATS file, line by line: the header counts, the bidders so far (an
    XOR group per dummy good) and the bid lines seen."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.header: dict[str, int] = {}
        self.groups: dict[int, int] = {}  # dummy good -> bidder index
        self.bidders: list[list[tuple[float, tuple[int, ...]]]] = []
        self.bid_lines = 0

    def line(self, lineno: int, line: str) -> None:
        """Take one line: blank, a ``%`` comment, a header line or a bid."""
        stripped = line.strip()
        if not stripped or stripped.startswith("%"):
            return
        tokens = stripped.split()
        where = f"{self.path}:{lineno}"
        if tokens[0] in _CATS_HEADER_WORDS:
            self._header_line(tokens, stripped, where)
            return
        if "goods" not in self.header or "bids" not in self.header:
            raise BundleflowError(
                f"{where}: {stripped[:40]!r} before the 'goods G' and 'bids N' header lines; "
                "is this a CATS output file?"
            )
        amount, real, dummies = self._bid(tokens, stripped, where)
        if dummies:
            index = self.groups.setdefault(dummies[0], len(self.bidders))
            if index == len(self.bidders):
                self.bidders.append([])
        else:
            index = len(self.bidders)
            self.bidders.append([])
        self.bidders[index].append((amount, real))
        self.bid_lines += 1

    def _header_line(self, tokens: list[str], stripped: str, where: str) -> None:
        if self.bid_lines:
            raise BundleflowError(f"{where}: header line {tokens[0]!r} after the first bid")
        if len(tokens) != 2 or not tokens[1].isdigit():
            raise BundleflowError(
                f"{where}: malformed header line {stripped!r}; expected '{tokens[0]} <count>'"
            )
        self.header[tokens[0]] = int(tokens[1])

    def _bid(
        self, tokens: list[str], stripped: str, where: str
    ) -> tuple[float, tuple[int, ...], list[int]]:
        """A bid line's amount, real goods and dummy goods, every field checked."""
        bid_id, amount, items = _bid_fields(tokens, stripped, where)
        goods, n_dummy = self.header["goods"], self.header.get("dummy", 0)
        if bid_id != self.bid_lines:
            raise BundleflowError(
                f"{where}: bid id {bid_id}, expected {self.bid_lines} (ids count from 0)"
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
        return amount, real, dummies

    def result(self, text: str, last_line: int) -> CatsText:
        """The parsed file, once the header is complete and the bid count matches it."""
        path, header, bid_lines = self.path, self.header, self.bid_lines
        missing = [k for k in ("goods", "bids") if k not in header]
        if missing:
            raise BundleflowError(
                f"{path}: no {' / '.join(missing)} header line"
                + (" (the file is empty)" if not text.strip() else "")
                + "; expected a CATS output file with 'goods G', 'bids N', 'dummy D' and bid lines"
            )
        if bid_lines != header["bids"]:
            raise BundleflowError(
                f"{path}:{last_line}: the header announces {header['bids']} bids but the file "
                f"has {bid_lines} bid lines"
                + (" (truncated?)" if bid_lines < header["bids"] else "")
                + "; regenerate the file with CATS"
            )
        if not self.bidders:
            raise BundleflowError(f"{path}: the file has no bids")
        return CatsText(
            goods=header["goods"],
            bids=header["bids"],
            dummy=header.get("dummy", 0),
            bid_lines=bid_lines,
            bidders=self.bidders,
        )


def _bid_fields(tokens: list[str], stripped: str, where: str) -> tuple[int, float, list[int]]:
    """``bid_id amount good good ... #`` split into its id, amount and goods."""
    if tokens[-1] != "#":
        raise BundleflowError(
            f"{where}: a bid line must end with '#' (the file may be truncated); "
            "expected 'bid_id amount good good ... #'"
        )
    if len(tokens) < 4:
        raise BundleflowError(f"{where}: a bid needs an id, an amount and at least one good")
    try:
        return int(tokens[0]), float(tokens[1]), [int(tok) for tok in tokens[2:-1]]
    except ValueError:
        raise BundleflowError(
            f"{where}: non-numeric field in {stripped[:60]!r}; expected "
            "'bid_id amount good good ... #'"
        ) from None
