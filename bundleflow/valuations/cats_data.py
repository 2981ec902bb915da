"""Generated CATS data sets on disk: their metadata, the command that regenerates them, a cache.

A generated set records the generator settings and seed (enough to regenerate it bit for
bit), the split, and the ``bundleflow data generate`` command that reproduces it. The cache
holds sets under ``<cache>/data/`` named by a hash of settings, seed and split, so a
training preset can name a set by its settings. The known-optimum sets' counterpart is
:mod:`bundleflow.valuations.known_data`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
from collections.abc import Callable
from pathlib import Path

from loguru import logger

from bundleflow import __version__
from bundleflow.errors import BundleflowError
from bundleflow.paths import default_cache_dir
from bundleflow.valuations import cats, cats_generate
from bundleflow.valuations.dataset import load_dataset
from bundleflow.valuations.split import DEFAULT_SPLIT, split_from_fractions
from bundleflow.valuations.tensor_files import safetensors_output, save_dataset

# The cache key's version: what a cached file holds, which format version 2 did not change.
# Keeping it keeps the names of the sets already cached (their version-1 files are read as
# they are).
_CACHE_KEY_VERSION = 1


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
    valuations = cats_generate.generate(
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
    """The hash that names a cached set: settings (seed included), split, key version."""
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
