"""`bundleflow data ...` commands (generate, stats, convert).

Each handler takes the parsed arguments and returns an exit code; user errors are raised as
:class:`BundleflowError` and turned into one line on stderr and exit 2 by ``cli.main``.
``--json`` writes exactly one JSON object to stdout; logs and the progress bar go to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import fields

from loguru import logger

from bundleflow.errors import BundleflowError
from bundleflow.system.progress import ProgressBar
from bundleflow.valuations import cats, known, known_data
from bundleflow.valuations.cats_data import generate_dataset
from bundleflow.valuations.dataset import convert, load_dataset
from bundleflow.valuations.split import DEFAULT_SPLIT
from bundleflow.valuations.stats import dataset_stats

# Help for every CATS parameter flag (defaults come from CatsParams and are shown by --help).
PARAM_HELP = {
    "max_good_value": "common values c ~ U[1, this]",
    "deviation": "upv private values ~ U[-dev*max_good_value, +dev*max_good_value]",
    "normal_mean": "npv private values ~ N(mean, stdev): the mean",
    "normal_stdev": "npv private values ~ N(mean, stdev): the standard deviation",
    "additional_location": "probability of trying to add one more good to a bundle (< 1)",
    "additivity": "alpha in the size term |B|^(1+alpha) added to a bundle's value",
    "budget_factor": "a substitute's value must be <= this * v(B)",
    "resale_factor": "a substitute's common value must be >= this * common value of B",
    "max_substitutable_bids": "at most this many substitutes (K = 1 + this atoms)",
    "remove_neighbor": "regions: probability of dropping each right/down grid edge",
    "additional_neighbor": "regions: per cell, probability of one diagonal edge",
    "jump_prob": "regions: probability that an add picks a uniformly random good",
}
REGIONS_ONLY = ("remove_neighbor", "additional_neighbor", "jump_prob")


def _parse_split(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not TRAIN,VAL,TEST (e.g. 0.90,0.05,0.05)"
        ) from None
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"{text!r} is not TRAIN,VAL,TEST (e.g. 0.90,0.05,0.05)")
    return parts  # type: ignore[return-value]


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `data` command group to the top-level parser."""
    data = sub.add_parser(
        "data",
        help="generate, inspect and convert valuation data sets",
        description="Generate CATS valuation sets, print their statistics, convert files.",
    )
    data.set_defaults(func=lambda args: data.print_help(sys.stderr) or 2)
    actions = data.add_subparsers(dest="data_command", metavar="ACTION")
    _add_generate(actions)
    _add_stats(actions)
    _add_convert(actions)


def _add_generate(actions: argparse._SubParsersAction) -> None:
    """`data generate`: what to draw, then the known-optimum and the CATS parameters."""
    gen = actions.add_parser(
        "generate",
        help="generate a CATS or a known-optimum data set",
        description=(
            "Generate N CATS XOR valuations (--dist; one bidder per sample), or a setting with "
            "a known optimal revenue (--setting; its optimum goes into the file's metadata), "
            "and save them with their settings, seed, split and checksum. Same settings and "
            "seed give the same bytes."
        ),
    )
    _set_args(gen)
    _known_args(gen)
    _cats_param_args(gen)
    gen.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="W",
        help="processes (default: all CPUs for large N); the output does not depend on it",
    )
    gen.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    gen.add_argument("--no-progress", action="store_true", help="no progress bar")
    gen.set_defaults(func=cmd_generate)


def _set_args(gen: argparse.ArgumentParser) -> None:
    """The set itself: its source (a CATS distribution or a setting), size, seed, output,
    private values, mode and split."""
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--dist", choices=cats.DISTRIBUTIONS, help="a CATS distribution")
    source.add_argument(
        "--setting", choices=known.SETTINGS, help="a known-optimum setting (spec/optima.md)"
    )
    gen.add_argument(
        "--items",
        type=int,
        default=None,
        metavar="M",
        help="number of goods m (required with --dist; --setting: the setting's default)",
    )
    gen.add_argument(
        "--n",
        required=True,
        type=int,
        metavar="N",
        help="number of samples (--setting: training samples; see --val-n, --test-n)",
    )
    gen.add_argument("--seed", required=True, type=int, metavar="S")
    gen.add_argument("--out", required=True, metavar="FILE", help="output .safetensors file")
    gen.add_argument(
        "--values",
        default="upv",
        choices=cats.PRIVATE_VALUES,
        help="private values: uniform (upv, default) or normal (npv)",
    )
    gen.add_argument(
        "--mode",
        default="fresh",
        choices=cats.MODES,
        help="fresh (default): new map and common values per sample; fixed: one for all",
    )
    gen.add_argument(
        "--split",
        type=_parse_split,
        default=DEFAULT_SPLIT,
        metavar="TRAIN,VAL,TEST",
        help="contiguous split fractions, recorded in the file (default 0.90,0.05,0.05)",
    )


def _cats_param_args(gen: argparse.ArgumentParser) -> None:
    """One flag per CATS parameter (``--max-good-value``, ...), defaults from CatsParams."""
    params = gen.add_argument_group("CATS parameters (CATS 2.2 defaults)")
    defaults = cats.CatsParams()
    for f in fields(cats.CatsParams):
        default = getattr(defaults, f.name)
        params.add_argument(
            "--" + f.name.replace("_", "-"),
            type=type(default),
            default=None,
            metavar="X",
            help=f"{PARAM_HELP[f.name]} (default {default})",
        )


def _add_stats(actions: argparse._SubParsersAction) -> None:
    stats = actions.add_parser(
        "stats",
        help="statistics of a data set (mean atoms, atom sizes, max values)",
        description="Validate a data file and print its statistics and metadata.",
    )
    stats.add_argument("file", metavar="FILE")
    stats.add_argument(
        "--items", type=int, default=None, metavar="M", help="also check that the data has M items"
    )
    stats.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    stats.set_defaults(func=cmd_stats)


def _add_convert(actions: argparse._SubParsersAction) -> None:
    conv = actions.add_parser(
        "convert",
        help="convert .pt / .zip / CATS text / .safetensors to .safetensors or .pt",
        description=(
            "Read any supported file (bundleflow .safetensors, reference .pt or the zip it is "
            "published in, CATS text output), validate it and write OUT: .safetensors keeps "
            "metadata and split (the reference split if IN has none), .pt the bare tensor."
        ),
    )
    conv.add_argument("src", metavar="IN")
    conv.add_argument("dst", metavar="OUT")
    conv.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    conv.set_defaults(func=cmd_convert)


def _known_args(gen: argparse.ArgumentParser) -> None:
    group = gen.add_argument_group("known-optimum settings (--setting)")
    group.add_argument(
        "--val-n",
        type=int,
        default=known_data.DEFAULT_VAL,
        metavar="N",
        help=f"validation samples (default {known_data.DEFAULT_VAL})",
    )
    group.add_argument(
        "--test-n",
        type=int,
        default=known_data.DEFAULT_TEST,
        metavar="N",
        help=f"test samples (default {known_data.DEFAULT_TEST}: a 1%% room needs ≥ 10⁵)",
    )
    group.add_argument(
        "--high",
        type=float,
        default=None,
        metavar="X",
        help="specialists: the flexible type's value (1.9); unit-demand: values ≤ this (3)",
    )
    group.add_argument(
        "--low", type=float, default=None, metavar="X", help="unit-demand: values ≥ this (2)"
    )
    group.add_argument(
        "--catalogue-size", type=int, default=None, metavar="K", help="catalogue: bundles (100)"
    )
    group.add_argument(
        "--synergy-max",
        type=float,
        default=None,
        metavar="X",
        help="catalogue: synergy log-uniform on [1, X] (4)",
    )
    group.add_argument(
        "--catalogue-seed",
        type=int,
        default=None,
        metavar="S",
        help="catalogue: seed of the catalogue, apart from --seed (0)",
    )


KNOWN_FLAGS = ("items", "high", "low", "catalogue_size", "synergy_max", "catalogue_seed")


def _generate_known(args: argparse.Namespace) -> dict:
    """``--setting``: the set, its optimum in the metadata; returns the printed record."""
    given = {k: getattr(args, k) for k in KNOWN_FLAGS if getattr(args, k) is not None}
    allowed = set(known.DEFAULTS[args.setting]) | {"n_items"}
    params = {("n_items" if k == "items" else k): v for k, v in given.items()}
    extra = sorted(set(params) - allowed)
    if extra:
        flags = ", ".join(
            "--" + ("items" if k == "n_items" else k).replace("_", "-") for k in extra
        )
        raise BundleflowError(f"--setting {args.setting} does not take {flags}")
    setting = known_data.setting_or_error(args.setting, **params)
    sizes = {"train": args.n, "val": args.val_n, "test": args.test_n}
    start = time.perf_counter()
    path = known_data.generate_known_dataset(args.out, setting, sizes, args.seed)
    seconds = time.perf_counter() - start
    data = load_dataset(path)  # read back: validates and checks the checksum
    logger.info("wrote {} ({} valuations) in {:.1f}s", path, sum(sizes.values()), seconds)
    opt = setting.optimum
    return {
        "out": str(path),
        "seconds": round(seconds, 3),
        "sha256": data.metadata["sha256"],
        "split": data.split.sizes(),
        "setting": opt.setting,
        "parameters": opt.parameters,
        "optimum": opt.optimum,
        "best_deterministic": opt.best_deterministic,
        "best_posted_price": opt.best_posted_price,
        **dataset_stats(data.valuations),
    }


def _emit(result: dict, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(result, sort_keys=True) + "\n")
        return
    lines = []
    for key, value in result.items():
        if isinstance(value, float):
            value = f"{value:.4g}"
        elif isinstance(value, dict):
            value = json.dumps(value)
        lines.append(f"{key:>18}: {value}")
    sys.stdout.write("\n".join(lines) + "\n")


def cmd_generate(args: argparse.Namespace) -> int:
    if args.setting is not None:
        _emit(_generate_known(args), args.json)
        return 0
    if args.items is None:
        raise BundleflowError("--dist needs --items M (the number of goods)")
    overrides = {
        f.name: getattr(args, f.name)
        for f in fields(cats.CatsParams)
        if getattr(args, f.name) is not None
    }
    params = cats.CatsParams(**overrides)
    if args.dist == "arbitrary":
        ignored = [k for k in REGIONS_ONLY if k in overrides]
        if ignored:
            logger.warning("arbitrary has no grid and never jumps: ignoring {}", ignored)
    if args.workers is not None and args.workers < 1:
        raise BundleflowError(f"--workers must be ≥ 1, got {args.workers}")
    bar = ProgressBar(
        args.n, f"{args.dist} m={args.items}", enabled=False if args.no_progress else None
    )
    start = time.perf_counter()
    path = generate_dataset(
        args.out,
        args.dist,
        args.items,
        args.n,
        args.seed,
        params=params,
        private_values=args.values,
        mode=args.mode,
        split=args.split,
        workers=args.workers,
        progress=bar,
    )
    seconds = time.perf_counter() - start
    data = load_dataset(path)  # read back: validates and checks the checksum
    logger.info("wrote {} ({} valuations) in {:.1f}s", path, args.n, seconds)
    result = {
        "out": str(path),
        "seconds": round(seconds, 3),
        "sha256": data.metadata["sha256"],
        "split": data.split.sizes(),
        **dataset_stats(data.valuations),
    }
    _emit(result, args.json)
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    data = load_dataset(args.file, n_items=args.items)
    result: dict = {"file": str(data.path), **dataset_stats(data.valuations)}
    result["split"] = data.split.sizes()
    result["split_origin"] = data.split.origin
    if "sha256" in data.metadata:
        result["sha256"] = data.metadata["sha256"]
    generator = data.metadata.get("generator")
    if generator:
        result["generator"] = generator
    if "regenerate" in data.metadata:
        result["regenerate"] = data.metadata["regenerate"]
    if "known" in data.metadata:
        result["known"] = {
            k: data.metadata["known"].get(k)
            for k in ("setting", "parameters", "optimum", "best_deterministic", "best_posted_price")
        }
    _emit(result, args.json)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    data = convert(args.src, args.dst)
    logger.info("converted {} -> {} ({} valuations)", args.src, args.dst, data.valuations.shape[0])
    result = {
        "in": str(args.src),
        "out": str(args.dst),
        "shape": list(data.valuations.shape),
        "split": data.split.sizes(),
        "split_origin": data.split.origin,
    }
    _emit(result, args.json)
    return 0
