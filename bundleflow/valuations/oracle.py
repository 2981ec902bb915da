"""One entry point for bundle values, whatever the valuation family."""

from __future__ import annotations

from torch import Tensor

from bundleflow.valuations.additive import additive_bundle_values
from bundleflow.valuations.xor import xor_bundle_values


def bundle_values(valuations: Tensor, bundles: Tensor, **kwargs) -> Tensor:
    """``[B, A]`` values: XOR for ``[B, K, m+1]`` inputs, additive for ``[B, m]``."""
    if valuations.dim() == 3:
        return xor_bundle_values(valuations, bundles, **kwargs)
    if valuations.dim() == 2:
        return additive_bundle_values(valuations, bundles)
    raise ValueError(
        f"valuations must be [B, K, m+1] (XOR) or [B, m] (additive), got {tuple(valuations.shape)}"
    )
