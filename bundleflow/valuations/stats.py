"""Summary statistics of an XOR data set: what a user checks first after generating one."""

from __future__ import annotations

import torch
from torch import Tensor

from bundleflow.valuations.xor import atoms_and_values


def _median(x: Tensor) -> float:
    """The usual median (mean of the two middle values for an even count)."""
    ordered = x.sort().values
    n = ordered.numel()
    mid = n // 2
    if n % 2:
        return float(ordered[mid])
    return float((ordered[mid - 1] + ordered[mid]) / 2)


@torch.no_grad()
def dataset_stats(valuations: Tensor) -> dict[str, float | int | dict[str, int]]:
    """Statistics of ``[N, K, m+1]`` XOR valuations (zero rows pad; an atom has an item).

    Keys: ``n``, ``n_items``, ``atoms_per_row`` (K), ``mean_atoms``, ``share_six_atoms``
    (share with exactly 6 atoms, CATS's default maximum), ``share_full_atoms`` (exactly K),
    ``atoms_histogram``, ``mean_atom_size`` / ``median_atom_size`` (over valuations, of each
    valuation's mean atom size — in CATS all atoms of one valuation have the same size),
    ``mean_max_value`` (mean of max_k b_k), ``value_min`` / ``value_max`` (over atoms) and
    ``max_value_min`` / ``max_value_max`` (range of max_k b_k).
    """
    items, values = atoms_and_values(valuations.float())  # (N, K, m), (N, K)
    sizes = items.sum(-1)  # (N, K)
    is_atom = sizes > 0
    n_atoms = is_atom.sum(-1)  # (N,)
    per_valuation_size = sizes.sum(-1) / n_atoms.clamp(min=1)  # (N,)
    atom_values = values[is_atom]
    max_value = values.amax(-1)  # (N,)
    width = valuations.shape[1]
    histogram = torch.bincount(n_atoms, minlength=width + 1)
    return {
        "n": int(valuations.shape[0]),
        "n_items": int(valuations.shape[2] - 1),
        "atoms_per_row": int(width),
        "mean_atoms": float(n_atoms.float().mean()),
        "share_six_atoms": float((n_atoms == 6).float().mean()),
        "share_full_atoms": float((n_atoms == width).float().mean()),
        "atoms_histogram": {str(k): int(c) for k, c in enumerate(histogram.tolist()) if k},
        "mean_atom_size": float(per_valuation_size.mean()),
        "median_atom_size": _median(per_valuation_size),
        "mean_max_value": float(max_value.mean()),
        "value_min": float(atom_values.min()),
        "value_max": float(atom_values.max()),
        "max_value_min": float(max_value.min()),
        "max_value_max": float(max_value.max()),
    }
