"""Strict building and checking of the config (:mod:`bundleflow.train.config`): unknown keys,
wrong types, values outside their choices, counts that must be positive and combinations
that cannot run are each one :class:`BundleflowError` naming the key."""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import fields
from typing import Any

from bundleflow.errors import BundleflowError

CHOICES = {
    "device": ("auto", "cuda", "mps", "cpu"),
    "mixed_precision": (None, "no", "fp16", "bf16"),
    "data.kind": ("cats", "file", "additive", "known"),
    "data.setting": (
        "specialists",
        "unit-demand",
        "additive-ddt",
        "additive-uniform",
        "catalogue",
    ),
    "data.dist": ("arbitrary", "regions"),
    "data.values": ("upv", "npv"),
    "data.mode": ("fresh", "fixed"),
    "menu.fallback": ("none", "item", "size", "best"),
    "menu.init_bundles": ("random", "atoms", "atom_pairs"),
    "menu.lottery_weights": ("density", "mixture"),
    "menu.lottery_price": ("expected", "cheapest"),
    "menu.bundle_grad": ("none", "straight_through"),
    "stage2.path": ("fast", "reference"),
    "stage2.step_mode": ("auto", "eager", "graph"),
    "stage2.parallel": ("shard", "replicate"),
    "stage2.kernels": ("auto", "plain", "fused", "compiled"),
    "stage1.lr_schedule": ("constant", "cosine"),
}


POSITIVE = (
    "data.n_items",
    "data.n_samples",
    "data.additive_val_samples",
    "data.additive_test_samples",
    "data.known_val_samples",
    "data.known_test_samples",
    "data.catalogue_size",
    "flow.n_components",
    "flow.euler_steps",
    "stage1.steps",
    "stage1.batch_size",
    "stage1.log_every",
    "stage1.checkpoint_every",
    "menu.size",
    "menu.support",
    "stage2.steps",
    "stage2.batch_size",
    "stage2.eval_every",
    "stage2.log_every",
    "stage2.checkpoint_every",
    "stage2.sync_every",
    "stage2.inv_temp.interval",
    "stage2.inv_temp.reset_interval",
    "eval.batch_size",
)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except BundleflowError as err:
                errors.append(str(err))
        raise BundleflowError(errors[0] if errors else f"config key {key!r}: bad value")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise BundleflowError(
                f"config key {key!r}: expected a list of {len(args)} numbers, got {value!r}"
            )
        return tuple(
            _coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))
        )
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise BundleflowError(f"config key {key!r}: expected a mapping, got {value!r}")
        return build(tp, value, prefix=f"{key}.")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            raise BundleflowError(f"config key {key!r}: {value} is too large") from None
    if tp is float and isinstance(value, float) and not math.isfinite(value):
        raise BundleflowError(f"config key {key!r}: expected a finite number, got {value!r}")
    if tp is bool and not isinstance(value, bool):
        raise BundleflowError(f"config key {key!r}: expected true/false, got {value!r}")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise BundleflowError(f"config key {key!r}: expected an integer, got {value!r}")
    if tp is str and isinstance(value, bool) and ("yes" if value else "no") in CHOICES.get(key, ()):
        return "yes" if value else "no"  # YAML 1.1 reads unquoted no/yes as booleans
    if not isinstance(value, tp):
        raise BundleflowError(
            f"config key {key!r}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}"
        )
    return value


def build(cls: type, values: dict, prefix: str = "") -> Any:
    """``cls`` (a config dataclass) from ``values``: unknown keys and wrong types are a user
    error naming the dotted key."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(str(k) for k in set(values) - known)
    if unknown:
        key = prefix + unknown[0]
        section = prefix.rstrip(".") or "the top level"
        raise BundleflowError(
            f"unknown config key {key!r}; valid keys in {section}: {', '.join(sorted(known))}"
        )
    kwargs = {}
    for f in fields(cls):
        if f.name in values:
            kwargs[f.name] = _coerce(values[f.name], hints[f.name], prefix + f.name)
    return cls(**kwargs)


def check_values(config, flat: dict) -> None:
    """Every choice among its allowed values, every count positive, and the combinations
    that cannot run refused (``flat``: the config as dotted keys)."""
    for key, allowed in CHOICES.items():
        if key == "device" and re.fullmatch(r"cuda:\d+", str(flat[key])):
            continue  # one GPU by index; resolve_device checks it against the GPUs
        if flat[key] not in allowed:
            shown = ", ".join("null" if a is None else str(a) for a in allowed)
            shown += ", cuda:N (N a GPU index)" if key == "device" else ""
            raise BundleflowError(f"config key {key!r}: {flat[key]!r} is not one of {shown}")
    for key in POSITIVE:
        if flat[key] <= 0:
            raise BundleflowError(f"config key {key!r} must be positive, got {flat[key]!r}")
    _check_combinations(config)


def _check_combinations(config) -> None:
    if config.menu.posted_price_init and config.menu.fallback == "none":
        raise BundleflowError(
            "config key 'menu.posted_price_init' needs a fallback to price against; "
            "set menu.fallback to item, size or best"
        )
    if not config.menu.offer_fallback and config.menu.fallback == "none":
        raise BundleflowError(
            "config key 'menu.offer_fallback': false needs a fallback (menu.fallback item, "
            "size or best) to price the initial elements and to select against"
        )
    if not 0 < config.menu.init_inclusion < 1:
        raise BundleflowError(
            "config key 'menu.init_inclusion' must be strictly between 0 and 1, got "
            f"{config.menu.init_inclusion!r}"
        )
    if config.menu.grand_bundle_prices and not config.menu.grand_bundle_element:
        raise BundleflowError(
            "config key 'menu.grand_bundle_prices' needs menu.grand_bundle_element: true "
            "(the grand bundle's fitted price is what the elements start at)"
        )
    if config.stage2.polish_rounds < 0:
        raise BundleflowError(
            f"config key 'stage2.polish_rounds' must be >= 0, got {config.stage2.polish_rounds}"
        )
    if config.stage2.polish_soft_steps < 0:
        raise BundleflowError(
            "config key 'stage2.polish_soft_steps' must be >= 0, got "
            f"{config.stage2.polish_soft_steps}"
        )
    for key in ("polish_soft_temp", "polish_soft_lr"):
        if not getattr(config.stage2, key) > 0:
            raise BundleflowError(
                f"config key 'stage2.{key}' must be positive, got {getattr(config.stage2, key)!r}"
            )
    if config.menu.bundle_grad != "none" and not config.menu.bundle_temp > 0:
        raise BundleflowError(
            f"config key 'menu.bundle_temp' must be positive, got {config.menu.bundle_temp!r}"
        )
    if config.menu.bundle_grad != "none" and config.stage2.path != "fast":
        raise BundleflowError(
            "config key 'menu.bundle_grad': straight_through needs stage2.path=fast"
        )
    if config.data.kind == "file" and not config.data.path:
        raise BundleflowError("config key 'data.path' is required when data.kind is 'file'")
