"""The check every loaded or saved data set passes: well-formed XOR valuations ``[N, K, m+1]``.

Each problem a user can cause raises :class:`~bundleflow.errors.BundleflowError` naming the
file (or the source it came from), where in the tensor the problem is, and the fix.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from bundleflow.errors import BundleflowError

_LAYOUT = "the reference layout is a tensor [N, K, m+1]: 0/1 item columns, value last"


def _first_index(mask: Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in mask.nonzero()[0])


def validate_xor(tensor: object, source: str | os.PathLike, n_items: int | None = None) -> Tensor:
    """Check XOR valuations ``[N, K, m+1]`` and return them as contiguous float32 on the CPU.

    Raises :class:`BundleflowError` naming ``source`` for: not a tensor, wrong rank or
    shape, an empty set, m different from ``n_items``, NaN/inf, bundle columns other than
    0/1, negative values, a value on an empty bundle, a valuation without any atom.
    """
    where = str(source)
    t = _check_layout(tensor, where, n_items).detach().to("cpu", torch.float32).contiguous()
    _check_numbers(t, where)
    _check_atoms(t, where)
    return t


def _check_layout(tensor: object, where: str, n_items: int | None) -> Tensor:
    """``tensor``, checked to be a real, non-boolean tensor of rank 3 with room for atoms and,
    if ``n_items`` is given, m = ``n_items`` items."""
    if not isinstance(tensor, Tensor):
        raise BundleflowError(
            f"{where}: expected a tensor, found {type(tensor).__name__}; {_LAYOUT}"
        )
    if tensor.is_complex() or tensor.dtype == torch.bool:
        raise BundleflowError(f"{where}: unsupported dtype {tensor.dtype}; {_LAYOUT}")
    if tensor.dim() != 3:
        raise BundleflowError(
            f"{where}: expected rank 3 [N, K, m+1], found shape {tuple(tensor.shape)}; {_LAYOUT}"
        )
    n, k, width = tensor.shape
    if n == 0:
        raise BundleflowError(f"{where}: the data set is empty (0 valuations); {_LAYOUT}")
    if k == 0 or width < 2:
        raise BundleflowError(
            f"{where}: shape {tuple(tensor.shape)} has no room for atoms (need K ≥ 1 and "
            f"m+1 ≥ 2); {_LAYOUT}"
        )
    if n_items is not None and width - 1 != n_items:
        raise BundleflowError(
            f"{where}: the data has m={width - 1} items but this run uses m={n_items}; use "
            f"data with {n_items} items (`bundleflow data generate --items {n_items}`) or set "
            f"the run's number of items to {width - 1}"
        )
    return tensor


def _check_numbers(t: Tensor, where: str) -> None:
    """Every number finite, item columns 0 or 1, values ≥ 0 (the first offender is named)."""
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


def _check_atoms(t: Tensor, where: str) -> None:
    """Padding rows all zero, and at least one atom (a non-empty bundle) per valuation."""
    items, values = t[..., :-1], t[..., -1]
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
