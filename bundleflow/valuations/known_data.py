"""Known-optimum data sets on disk: generate, record the optimum in the metadata, cache.

A set holds ``n_train + n_val + n_test`` valuations of one setting of
:mod:`bundleflow.valuations.known` in that order (absolute split sizes, recorded); each part
is drawn from its own stream of the seed, so a larger test split leaves the training part
unchanged. The metadata key ``known`` holds :meth:`KnownOptimum.to_dict`: setting,
parameters, optimum, best deterministic and best posted-price revenue.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
from pathlib import Path

import torch
from loguru import logger
from torch import Tensor

from bundleflow import __version__
from bundleflow.errors import BundleflowError
from bundleflow.paths import default_cache_dir
from bundleflow.valuations.dataset import load_dataset
from bundleflow.valuations.known import DEFAULTS, KnownSetting, make_setting
from bundleflow.valuations.split import Split
from bundleflow.valuations.tensor_files import safetensors_output, save_dataset

DEFAULT_VAL = 20_000
"""Validation valuations of a generated known-optimum set."""
DEFAULT_TEST = 100_000
"""Test valuations: ≥ 10⁵, so that a 1% room is resolved (the hard evaluation is cheap)."""
ALGORITHM_VERSION = 1
_STREAMS = {"train": 1, "val": 2, "test": 3}


def setting_or_error(setting: str, **params) -> KnownSetting:
    """:func:`make_setting` with a bad setting or parameter as a user error."""
    try:
        return make_setting(setting, **params)
    except ValueError as err:
        raise BundleflowError(f"known-optimum setting: {err}") from None


def sample_parts(known: KnownSetting, sizes: dict[str, int], seed: int) -> Tensor:
    """Train, validation and test valuations concatenated, each from its own stream."""
    parts = []
    for name in ("train", "val", "test"):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + _STREAMS[name])
        parts.append(known.sample(sizes[name], gen))
    return torch.cat(parts)


def settings_record(known: KnownSetting, sizes: dict[str, int], seed: int) -> dict:
    """Everything that determines the generated numbers (the cache key is its hash)."""
    return {
        "name": "known",
        "algorithm_version": ALGORITHM_VERSION,
        "setting": known.name,
        "params": known.params,
        "n_items": known.n_items,
        "sizes": dict(sizes),
        "seed": seed,
    }


def regenerate_command(record: dict) -> str:
    """The `bundleflow data generate` command that reproduces a set."""
    sizes = record["sizes"]
    args = ["bundleflow", "data", "generate", "--setting", record["setting"]]
    args += ["--n", str(sizes["train"]), "--val-n", str(sizes["val"])]
    args += ["--test-n", str(sizes["test"]), "--seed", str(record["seed"])]
    for key, value in record["params"].items():
        if key == "n_items":
            args += ["--items", str(value)]
        elif value != DEFAULTS[record["setting"]].get(key):
            args += ["--" + key.replace("_", "-"), repr(value)]
    return shlex.join([*args, "--out", "FILE"])


def generate_known_dataset(
    out: str | os.PathLike, known: KnownSetting, sizes: dict[str, int], seed: int
) -> Path:
    """Generate a known-optimum set and save it (atomically) with its optimum and split."""
    out = safetensors_output(out, "optimum")
    if sizes["train"] < 1 or sizes["val"] < 1 or sizes["test"] < 1:
        raise BundleflowError(f"split sizes {sizes} leave a part empty; every part needs ≥ 1")
    valuations = sample_parts(known, sizes, seed)
    a, b = sizes["train"], sizes["train"] + sizes["val"]
    split = Split((0, a), (a, b), (b, valuations.shape[0]), origin="recorded")
    record = settings_record(known, sizes, seed)
    meta = {
        "generator": record,
        "known": known.optimum.to_dict(),
        "split": split.to_dict(),
        "units": "the setting's value units (no normalisation)",
        "bundleflow_version": __version__,
        "regenerate": regenerate_command(record),
    }
    if known.catalogue is not None:
        meta["catalogue"] = {
            "bundles": [row.nonzero().squeeze(1).tolist() for row in known.catalogue.bundles],
            "weights": known.catalogue.weights.tolist(),
        }
    return save_dataset(out, valuations, meta)


def cached_known_dataset(
    known: KnownSetting,
    sizes: dict[str, int],
    seed: int,
    *,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """Path of the known-optimum set for these settings, generating it on first use (under
    ``<cache>/data/``, named by a hash of everything that determines it)."""
    record = settings_record(known, sizes, seed)
    key = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    name = f"known-{known.name}-m{known.n_items}-n{sizes['train']}-seed{seed}-{key[:16]}"
    path = root / "data" / f"{name}.safetensors"
    if path.exists():
        try:
            load_dataset(path, n_items=known.n_items)
            return path
        except BundleflowError as err:
            logger.warning("cached data set unusable, regenerating it: {}", err)
    else:
        logger.info("generating data set {} (cached for later runs)", path)
    return generate_known_dataset(path, known, sizes, seed)
