"""The train/val/test split of a data set: contiguous index ranges, recorded in its metadata.

A generated set records its split (fractions and ranges); a file without one (the reference
``.pt`` data, CATS text) gets the reference data's split, :func:`reference_split`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from bundleflow.errors import BundleflowError

DEFAULT_SPLIT = (0.90, 0.05, 0.05)
# The reference data's split: first 95% training (validation carved from its end), last 5% test.
REFERENCE_TRAIN_FRACTION = 0.95
REFERENCE_VAL_FRACTION_OF_TRAIN = 0.05


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


def split_from_metadata(meta: dict, n: int, source: str) -> Split:
    """The split a file's metadata records for its ``n`` samples; malformed or not covering
    the samples in order is a user error naming ``source``."""
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
