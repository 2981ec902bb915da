"""A CATS data set of n bidders (:mod:`bundleflow.valuations.cats`), reproducibly and in
parallel.

Everything per sample is plain Python on a ``random.Random`` seeded from (seed, index),
so a data set is byte-identical for the same settings and seed whatever the number of
worker processes, and stable across Python versions (``Random.random`` is documented as
reproducible). Generation is a data-preparation step, not a training hot path.
"""

from __future__ import annotations

import hashlib
import os
import random
import sys
from array import array
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from multiprocessing.context import BaseContext

import torch
from torch import Tensor

from bundleflow.errors import BundleflowError
from bundleflow.valuations.cats import (
    ALGORITHM_VERSION,
    DISTRIBUTIONS,
    MODES,
    PRIVATE_VALUES,
    Bidder,
    CatsParams,
    check_choice,
    check_items,
    make_structure,
    sample_bidder,
)

# Samples per task handed to a worker process, and the size below which one process is used
# (starting workers costs about a second: they import torch).
CHUNK_SIZE = 250
MIN_SAMPLES_PER_WORKER = 2_000


def bidder_rows(bidder: Bidder, n_items: int, n_atoms: int) -> list[float]:
    """The bidder as a flat row-major ``[n_atoms, n_items + 1]`` list (zero rows pad)."""
    width = n_items + 1
    flat = [0.0] * (n_atoms * width)
    for k, (atom, value) in enumerate(zip(bidder.atoms, bidder.values, strict=True)):
        base = k * width
        for item in atom:
            flat[base + item] = 1.0
        flat[base + n_items] = value
    return flat


def sample_rng(seed: int, index: int) -> random.Random:
    """The RNG of sample ``index``: a function of (seed, index) only."""
    return _derived_rng(f"sample:{seed}:{index}")


def structure_rng(seed: int) -> random.Random:
    """The RNG of the shared item structure in ``fixed`` mode."""
    return _derived_rng(f"structure:{seed}")


def _derived_rng(tag: str) -> random.Random:
    digest = hashlib.sha256(f"bundleflow/cats/v{ALGORITHM_VERSION}/{tag}".encode()).digest()
    return random.Random(int.from_bytes(digest[:16], "little"))


def _generate_range(
    dist: str,
    n_items: int,
    params_dict: dict,
    private_values: str,
    mode: str,
    seed: int,
    start: int,
    stop: int,
) -> bytes:
    """Samples ``start..stop-1`` as raw float32 bytes (the worker-process task)."""
    params = CatsParams(**params_dict)
    shared = make_structure(dist, n_items, params, structure_rng(seed)) if mode == "fixed" else None
    out = array("f")
    for index in range(start, stop):
        rng = sample_rng(seed, index)
        structure = shared if shared is not None else make_structure(dist, n_items, params, rng)
        bidder = sample_bidder(structure, params, private_values, rng)
        out.extend(bidder_rows(bidder, n_items, params.n_atoms))
    return out.tobytes()


def available_cpus() -> int:
    """CPUs this process may run on (the affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def _mp_context() -> BaseContext:
    # fork on Linux: workers start at once and need no `if __name__ == "__main__"` guard in
    # the caller's script; they run only pure Python, never torch, so a forked copy of
    # torch's thread pools is harmless. Elsewhere (macOS: fork is unsafe) spawn.
    return get_context("fork" if sys.platform.startswith("linux") else "spawn")


def generate(
    dist: str,
    n_items: int,
    n: int,
    seed: int,
    *,
    params: CatsParams | None = None,
    private_values: str = "upv",
    mode: str = "fresh",
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> Tensor:
    """``[n, 1 + max_substitutable_bids, n_items + 1]`` float32 CATS XOR valuations.

    Args:
        dist: ``"arbitrary"`` or ``"regions"``.
        n_items: m, the number of goods.
        n: number of samples (one bidder each).
        seed: any integer; sample i depends only on (seed, i) and, in ``fixed`` mode, the
            structure on seed alone — so the output does not depend on ``workers``.
        params: CATS parameters (defaults: CATS 2.2).
        private_values: ``"upv"`` (uniform) or ``"npv"`` (normal).
        mode: ``"fresh"`` (new map and common values per sample: i.i.d. samples) or
            ``"fixed"`` (one map and common values, i.i.d. bidders on it).
        workers: processes to use; default: all CPUs for large n, 1 for small n.
        progress: called with the number of samples done so far.

    Returns:
        Values in CATS units; atom 0 is B, then substitutes by descending value.
    """
    params = params or CatsParams()
    check_choice("dist", dist, DISTRIBUTIONS)
    check_choice("values", private_values, PRIVATE_VALUES)
    check_choice("mode", mode, MODES)
    check_items(dist, n_items)
    if not isinstance(n, int) or n < 1:
        raise BundleflowError(f"--n must be a whole number ≥ 1, got {n!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise BundleflowError(f"--seed must be an integer, got {seed!r}")
    if workers is None:
        workers = min(available_cpus(), max(1, n // MIN_SAMPLES_PER_WORKER))
    width = params.n_atoms * (n_items + 1)
    row_bytes = 4 * width
    # Results are gathered as bytes and turned into a tensor once at the end: torch ops in
    # this process while workers run would wake its thread pool, which then spins and
    # competes with the workers for the cores.
    buffer = bytearray(n * row_bytes)
    spans = [(a, min(a + CHUNK_SIZE, n)) for a in range(0, n, CHUNK_SIZE)]
    task = (dist, n_items, params.to_dict(), private_values, mode, seed)
    done = 0

    def store(span: tuple[int, int], raw: bytes) -> None:
        nonlocal done
        buffer[span[0] * row_bytes : span[1] * row_bytes] = raw
        done += span[1] - span[0]
        if progress is not None:
            progress(done)

    if workers <= 1 or len(spans) == 1:
        for span in spans:
            store(span, _generate_range(*task, *span))
    else:
        with ProcessPoolExecutor(max_workers=workers, mp_context=_mp_context()) as pool:
            futures = [pool.submit(_generate_range, *task, *span) for span in spans]
            for span, future in zip(spans, futures, strict=True):
                store(span, future.result())
    out = torch.frombuffer(buffer, dtype=torch.float32)
    return out.view(n, params.n_atoms, n_items + 1)
