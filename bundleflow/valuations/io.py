"""Valuation data files under the names callers import them by (``data_io.load_dataset``).

The code lives in the modules of each part: :mod:`~bundleflow.valuations.tensor_files` (our
``.safetensors`` format, the reference ``.pt`` and zip), :mod:`~bundleflow.valuations.cats_text`
(CATS text output), :mod:`~bundleflow.valuations.dataset` (any file read, validated and
split), :mod:`~bundleflow.valuations.split`, :mod:`~bundleflow.valuations.validate` and
:mod:`~bundleflow.valuations.cats_data` (generated CATS sets and their cache).
"""

from __future__ import annotations

from bundleflow.atomic import file_sha256
from bundleflow.valuations.cats_data import cached_dataset, generate_dataset
from bundleflow.valuations.dataset import Dataset, load_dataset, read_valuations
from bundleflow.valuations.tensor_files import save_dataset, tensor_sha256

__all__ = [
    "Dataset",
    "cached_dataset",
    "file_sha256",
    "generate_dataset",
    "load_dataset",
    "read_valuations",
    "save_dataset",
    "tensor_sha256",
]
