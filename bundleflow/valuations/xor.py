"""XOR valuations in the reference layout and the batched, chunked value oracle.

Layout: one valuation is a float tensor ``[K, m+1]``: K atoms (XOR bids), 0/1 item columns
and the atom's value in the last column. A batch is ``[B, K, m+1]``. Zero rows (empty set,
value 0) pad a valuation with fewer atoms; they never change a value because
v(S) = max{b_k : T_k ⊆ S} with 0 when no atom fits, and values are non-negative.

Inclusion test: T_k ⊆ S ⇔ T_k · (1 − S) = 0, so one matrix product per chunk tests every
(atom, bundle) pair. The product only has to get the zero/non-zero mask right: with 0/1
inputs and fp32 accumulation a count is an integer ≥ 1 or exactly 0, and rounding the
count to bf16/fp16 can never turn a positive count into 0. Low precision is therefore
exact here and is used on CUDA by default.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

# Elements of the (B·K, A) inclusion matrix materialised per chunk. On CPU a chunk that
# stays in cache (2**20 fp32 = 4 MiB) is as fast as one big pass or faster, with a small
# peak (measured with scripts/bench_core.py, since replaced by `bundleflow bench`); on a
# GPU big chunks keep kernels few, and 2**27 elements (512 MiB fp32) is small next to its
# memory.
CPU_CHUNK_ELEMENTS = 2**20
GPU_CHUNK_ELEMENTS = 2**27


def default_chunk_elements(device: torch.device) -> int:
    return GPU_CHUNK_ELEMENTS if device.type == "cuda" else CPU_CHUNK_ELEMENTS


def atoms_and_values(
    valuations: Tensor, *, dtype: torch.dtype | None = None, padding: float | None = None
) -> tuple[Tensor, Tensor]:
    """Split ``[B, K, m+1]`` into atoms ``[B, K, m]`` and values ``[B, K]``.

    ``dtype``: convert to it first (default: keep the input's). ``padding``: the value given
    to an empty atom (a zero padding row); None keeps its 0, which the value oracle needs.
    The posted-price rules pass −inf, so a padding row is never bought.
    """
    if dtype is not None:
        valuations = valuations.to(dtype)
    atoms, values = valuations[..., :-1], valuations[..., -1]
    if padding is not None:
        values = torch.where(atoms.sum(dim=-1) > 0, values, padding)
    return atoms, values


def default_inclusion_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA (tensor cores; the mask stays exact), fp32 elsewhere."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


@torch.no_grad()
def xor_bundle_values(
    valuations: Tensor,
    bundles: Tensor,
    *,
    chunk_elements: int | None = None,
    inclusion_dtype: torch.dtype | None = None,
) -> Tensor:
    """Value of every bundle to every XOR valuation.

    Args:
        valuations: ``[B, K, m+1]`` XOR valuations (reference layout, zero-row padding).
        bundles: ``[A, m]`` 0/1 bundles (any float or bool dtype).
        chunk_elements: bound on B·K·A_chunk, the inclusion matrix built at once;
            default by device (:func:`default_chunk_elements`).
        inclusion_dtype: dtype of the inclusion product; default bf16 on CUDA, else fp32.

    Returns:
        ``[B, A]`` values v_b(S_a) in the dtype of ``valuations``. No gradient: values
        are constants with respect to the menu parameters.
    """
    if valuations.dim() != 3:
        raise ValueError(f"valuations must be [B, K, m+1], got shape {tuple(valuations.shape)}")
    if bundles.dim() != 2 or bundles.shape[1] != valuations.shape[2] - 1:
        raise ValueError(
            f"bundles must be [A, m] with m={valuations.shape[2] - 1}, got {tuple(bundles.shape)}"
        )
    dtype = inclusion_dtype or default_inclusion_dtype(valuations.device)
    lacks = 1 - bundles.to(dtype)  # (A, m): 1 where S lacks the item
    return xor_values_from_lacks(valuations, lacks, chunk_elements=chunk_elements)


Epilogue = Callable[[Tensor, Tensor], Tensor]
"""(missing ``[B·K, A_c]``, values ``[B, K]``) -> ``[B, A_c]`` values (e.g. a compiled one)."""


@torch.no_grad()
def xor_values_from_lacks(
    valuations: Tensor,
    lacks: Tensor,
    *,
    chunk_elements: int | None = None,
    epilogue: Epilogue | None = None,
) -> Tensor:
    """:func:`xor_bundle_values` from 1 − S ``[A, m]`` given directly in the inclusion dtype.

    ``epilogue`` replaces the in-place max over atoms of 1[fits]·b_k (same result).
    """
    n_val, n_atoms, n_items = valuations.shape[0], valuations.shape[1], lacks.shape[1]
    n_bundles = lacks.shape[0]
    atoms, values = atoms_and_values(valuations)
    atoms_2d = atoms.reshape(n_val * n_atoms, n_items).to(lacks.dtype)  # (B·K, m)
    values_col = values.reshape(n_val * n_atoms, 1)  # (B·K, 1)
    out = valuations.new_empty(n_val, n_bundles)
    chunk_elements = chunk_elements or default_chunk_elements(valuations.device)
    chunk = max(1, chunk_elements // max(1, n_val * n_atoms))
    for start in range(0, n_bundles, chunk):  # chunks bound memory; not a loop over bundles
        stop = min(start + chunk, n_bundles)
        # (B·K, m) @ (m, A_c) -> (B·K, A_c): number of atom items the bundle lacks
        missing = atoms_2d @ lacks[start:stop].T
        if epilogue is not None:
            out[:, start:stop] = epilogue(missing, values)
            continue
        if missing.dtype == values_col.dtype:  # reuse the buffer: 1[fits] · b_k in place
            atom_vals = missing.eq_(0).mul_(values_col)
        else:  # never multiply values in low precision
            atom_vals = (missing == 0).to(values_col.dtype).mul_(values_col)
        out[:, start:stop] = atom_vals.view(n_val, n_atoms, stop - start).amax(dim=1)
    return out


def xor_relaxed_values(valuations: Tensor, inclusion: Tensor) -> Tensor:
    """A differentiable stand-in for the XOR value of relaxed bundles, per valuation.

    ``inclusion`` ``[B, A, m]`` holds s_b,a,i ∈ (0, 1), the relaxed 1[i ∈ S] of bundle a
    offered to valuation b. Atom k fits with "probability" Π_{i∈T_k} s_i (exact when the
    items are independent coin flips) and the value is max_k b_k·Π_{i∈T_k} s_i — v(S)
    itself at 0/1 inclusions. Returns ``[B, A]`` (float32) with a gradient to ``inclusion``.
    """
    atoms, values = atoms_and_values(valuations.float())  # (B, K, m), (B, K)
    log_s = inclusion.float().clamp_min(1e-12).log()  # (B, A, m)
    # e^-30 is "does not fit" at any value scale; the floor also keeps exp() out of the
    # subnormal range, which is many times slower on CPUs
    fit = torch.exp(torch.bmm(log_s, atoms.transpose(1, 2)).clamp_min(-30.0))  # (B, A, K)
    return (fit * values.unsqueeze(1)).amax(dim=-1)


def xor_value_bruteforce(valuation: Tensor, bundle: Tensor) -> float:
    """v(S) for one valuation ``[K, m+1]`` and one bundle ``[m]``, by definition.

    A deliberately plain loop used as the independent answer in tests; never in a hot path.
    """
    best = 0.0
    for row in valuation.tolist():
        items, value = row[:-1], row[-1]
        if all(s >= 0.5 for t, s in zip(items, bundle.tolist(), strict=True) if t >= 0.5):
            best = max(best, value)
    return best
