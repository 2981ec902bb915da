"""The one configuration schema: frozen dataclasses, strict loading, presets of overrides.

A run's config is built as: built-in defaults (this file) < preset YAML (``configs/NAME.yaml``
or a path, holding only overrides) < ``--set key=value`` (dotted keys, YAML values) <
command-line flags. Unknown keys and wrong types are a :class:`BundleflowError` naming the
key. Money-valued knobs are in *normalised* units: money is divided by a recorded scale s
(``data.money_scale``; default the training mean of the max atom value, additive: the mean of
Σv), and the defaults reproduce the reference's raw-unit dynamics on CATS m=50, where
s ≈ 750: λ_norm = λ_raw·750, price lr = 0.3/750, price init U[0, 1/750).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from bundleflow.errors import BundleflowError
from bundleflow.maths.schedule import REFERENCE_MONEY_SCALE, InvTempSchedule
from bundleflow.train.config_check import build, check_values


def _config_dir() -> Path:
    """Where the presets live: the installed package's ``bundleflow/presets`` (the checkout's
    ``configs/`` mapped into the package at build time, see pyproject.toml), else the
    checkout's ``configs/`` (an editable install, or a source tree run without installing)."""
    spec = importlib.util.find_spec("bundleflow.presets")
    for location in (spec.submodule_search_locations or ()) if spec else ():
        if any(Path(location).glob("*.yaml")):
            return Path(location)
    return Path(__file__).resolve().parents[2] / "configs"


CONFIG_DIR = _config_dir()
_INV_TEMP = InvTempSchedule()  # the λ defaults live with the schedule (normalised money)


@dataclass(frozen=True)
class DataConfig:
    """Where valuations come from and how money is normalised."""

    kind: str = "cats"
    """``cats`` (generated CATS set, cached), ``file`` (``path``), ``additive`` (U[0,1]^m) or
    ``known`` (a setting with a known optimal revenue, ``setting``; generated, cached)."""
    setting: str = "specialists"
    """Known-optimum setting (kind ``known``): ``specialists``, ``unit-demand``,
    ``additive-ddt``, ``additive-uniform`` or ``catalogue`` (spec/optima.md). m is
    ``n_items`` (unit-demand and additive-ddt: 2)."""
    dist: str = "arbitrary"
    """CATS distribution: ``arbitrary`` or ``regions``."""
    values: str = "upv"
    """CATS private values: ``upv`` or ``npv``."""
    mode: str = "fresh"
    """CATS sampling mode: ``fresh`` (new goods per sample) or ``fixed``."""
    n_items: int = 50
    """m, the number of items."""
    n_samples: int = 20000
    """Generated CATS samples (train + validation + test)."""
    seed: int = 0
    """Seed of the generated data set (and of additive validation/test draws)."""
    path: str | None = None
    """A data file (kind ``file``): ours, the reference ``.pt``/zip, or CATS text."""
    split: tuple[float, float, float] = (0.90, 0.05, 0.05)
    """Train/validation/test fractions of a generated set."""
    money_scale: float | None = None
    """Divide money by this; ``null``: training mean of max_k b_k (additive: mean of Σv)."""
    additive_val_samples: int = 100_000
    """Additive: fixed validation draws."""
    additive_test_samples: int = 1_000_000
    """Additive: fixed test draws."""
    known_val_samples: int = 20_000
    """Known settings: validation valuations (training: ``n_samples``)."""
    known_test_samples: int = 100_000
    """Known settings: test valuations (≥ 10⁵ resolves a 1% room; the hard evaluation is
    cheap)."""
    specialist_value: float = 1.9
    """specialists: the flexible type's value for its one item (the specialist's: 1 each)."""
    unit_low: float = 2.0
    """unit-demand: values U[unit_low, unit_high] per item."""
    unit_high: float = 3.0
    """unit-demand: values U[unit_low, unit_high] per item."""
    catalogue_size: int = 100
    """catalogue: K public bundles of 3–5 items, none inside another."""
    synergy_max: float = 4.0
    """catalogue: each bundle's synergy is log-uniform on [1, synergy_max]."""
    catalogue_seed: int = 0
    """catalogue: seed of the catalogue (bundles, item values, synergies), apart from
    ``seed`` (the bidders' draws)."""


@dataclass(frozen=True)
class FlowConfig:
    """The Stage-1 flow: network widths, source mixture, integrator."""

    hidden: int | None = None
    """h; ``null``: 128, or 256 above 100 items (the reference)."""
    hidden2: int | None = None
    """h'; ``null``: h, or 2h above 100 items (the reference)."""
    n_components: int = 3
    """Components of the Stage-1 source mixture."""
    log_std: float = -3.0
    """log std of every mixture component."""
    target_std: float = 0.1
    """Std of the Stage-1 target around the rounded corner."""
    euler_steps: int = 5
    """Euler steps N of the integrator."""


@dataclass(frozen=True)
class Stage1Config:
    """Stage-1 training (rectified flow)."""

    steps: int = 30000
    """Optimiser steps."""
    batch_size: int = 2048
    """Fresh pairs per step."""
    lr: float = 5e-3
    """Adam learning rate."""
    lr_schedule: str = "constant"
    """``constant`` (the reference) or ``cosine`` (lr decays to 0 over ``steps``)."""
    seed: int = 0
    """Seed of the mixture means and the training draws."""
    log_every: int = 100
    """Steps between metric lines."""
    checkpoint_every: int = 5000
    """Steps between resumable Stage-1 checkpoints in the run directory (``RUN/stage1``);
    Ctrl-C / SIGTERM also writes one. Not part of the flow's cache key. (At 0.2 ms per
    captured step on an H200, 5,000 steps are 1 s of work.)"""


@dataclass(frozen=True)
class MenuConfig:
    """The menu's shape and initialisation."""

    size: int = 5000
    """J, menu elements."""
    support: int = 8
    """D, support points per element (reference: 16 for additive)."""
    loc_offset: float = 0.05
    """a in μ = a + b·sigmoid(10M) (additive: 0.5)."""
    loc_scale: float = 0.9
    """b in μ = a + b·sigmoid(10M) (additive: 0.1)."""
    price_init: float = 1.0 / REFERENCE_MONEY_SCALE
    """Prices start U[0, price_init) (normalised money)."""
    grand_bundle_element: bool = False
    """bundleflow extension (not in the reference): element 0 starts as the grand bundle at
    the grand-bundle price fitted on the training split, so the menu can keep that option."""
    grand_bundle_prices: bool = False
    """bundleflow extension, with ``grand_bundle_element``: the other elements' prices start
    U[0, p_G) (p_G the grand bundle's fitted price) instead of U[0, price_init): spread
    below the grand bundle instead of nearly free. Measured no better at CATS m = 150
    (BENCHMARKS.md, issue 27, seventh pass), so no preset sets it."""
    fallback: str = "none"
    """bundleflow extension (not in the reference): offer, beside the J learned elements,
    a posted-price schedule fitted on the training split as one more option (index J; the
    bidder may buy any atom at those prices; still a menu, so DSIC and IR hold): ``none``
    (the reference), ``item`` (item pricing), ``size`` (bundle-size pricing) or ``best``
    (whichever earns more on the training split)."""
    init_inclusion: float = 0.5
    """bundleflow extension: with ``init_bundles: random``, the probability that an item sits
    in a support point's initial bundle, 0 < ρ < 1: M ~ N(Φ⁻¹(ρ), 1) (the reference: ρ = ½,
    M ~ N(0, 1)). Near 1 the elements start as random bundles a few items short of the grand
    bundle, which contain many bidders' atoms when m is large (at m = 150 a uniform ½-bundle
    contains a 10-item atom with probability 2⁻¹⁰, a 0.9-bundle with 0.35). Measured worse at
    CATS m = 150 (near-identical elements undercut each other; BENCHMARKS.md, issue 27,
    seventh pass), so no preset sets it."""
    init_bundles: str = "random"
    """bundleflow extension: ``random`` (the reference: M ~ N(0, 1)) or ``atoms``: element j
    starts as a deterministic offer of one bundle, the j-th atom of the training valuations
    by total value (frequency × value), every support point on that bundle's corner (the
    flow must map corners to themselves: a wide Stage-1 source, ``flow.log_std``), or
    ``atom_pairs``: the same deterministic offers of the top atoms, and every further element
    a lottery over two of them (half its support points on each, pairs drawn by the seed;
    with ``lottery_weights=mixture`` an even lottery whose odds are then learned). With
    ``posted_price_init`` each starts at the fallback's price of that bundle or lottery."""
    posted_price_init: bool = False
    """With a fallback: every learned element starts at the posted price of its initial
    lottery, Σ_d α_jd·c(S_jd) (recorded noise, initial λ), so it is weakly worse than the
    fallback for every bidder and the mechanism starts at the fallback's revenue; training
    moves elements below it where that earns more. False: prices start U[0, price_init)."""
    lottery_price: str = "expected"
    """With ``posted_price_init``: an element starts at the ``expected`` posted price of its
    lottery, Σ_d α_jd·c(S_jd) (weakly worse than the posted prices for every bidder), or at
    the ``cheapest`` of its bundles' posted prices, min_d c(S_jd) (the same for a deterministic
    element; a lottery then ties the cheaper bundle for a bidder who values its bundles alike,
    so raising that bundle's price moves such bidders onto the lottery instead of losing them:
    from ``expected`` no single price change gains, a trap coordinate steps cannot leave)."""
    bundle_grad: str = "none"
    """bundleflow extension: ``none`` (the reference: bundles S = 1[z_N ≥ 0.5] get no
    gradient; M moves only through the trace term) or ``straight_through``: the forward
    pass keeps the hard bundles and values, the backward pass differentiates a relaxed
    value through z_N and the flow to M — inclusion s = sigmoid((z_N − 0.5)/T), an atom
    fits with probability Π_{i∈atom} s_i, value max_k b_k·Π s_i (fast path, plain kernels)."""
    bundle_temp: float = 0.1
    """T of the relaxed inclusion (``bundle_grad=straight_through``)."""
    lottery_weights: str = "density"
    """bundleflow extension: how an element's probabilities α_jd over its D support points
    are formed. ``density`` (the reference): α = softmax_d(log N(z0; μ, σ) + log mixture −
    ΣQ·∫σ); the fixed random σ makes log N differ by tens of nats between points, so α is
    one-hot for most elements and the mixture logits cannot move it (at m=20 the median gap
    between an element's two likeliest points is 17.6 nats, and the mixture term sees
    λ/750 · w) — a lottery cannot be learned. ``mixture``: α = softmax_d(w_j), the exact
    mass each Dirac source component carries through the (deterministic, invertible) flow;
    w is learned directly (plain kernels)."""
    offer_fallback: bool = True
    """With a fallback: offer it beside the learned elements (option J). ``false``: the
    fitted schedule only prices the initial elements (``posted_price_init``) and is the
    reference the selection rule (``stage2.select_min_z``) compares against; the trained
    mechanism is the learned menu alone. An offered posted-price schedule caps what a menu
    can charge (a loss-leader item stays on sale), so settings whose optimum is a lottery
    need it off."""


@dataclass(frozen=True)
class InvTempConfig:
    """λ (``inv_temp``) schedule, normalised money units (see bundleflow.maths.schedule)."""

    initial: float = _INV_TEMP.value
    """Starting λ (the reference's 1e-3 × REFERENCE_MONEY_SCALE)."""
    cap: float = _INV_TEMP.cap
    """Largest λ (the reference's 0.2 × REFERENCE_MONEY_SCALE)."""
    growth: float = _INV_TEMP.growth
    """Factor every ``interval`` steps."""
    reset_value: float = _INV_TEMP.reset_value
    """λ after a reset (the reference's 0.05 × REFERENCE_MONEY_SCALE)."""
    slow_growth: float = _INV_TEMP.slow_growth
    """Factor after a reset."""
    interval: int = _INV_TEMP.interval
    """Steps between growth."""
    reset_interval: int = _INV_TEMP.reset_interval
    """Steps between reset checks."""
    location_threshold: float = _INV_TEMP.location_threshold
    """Reset checks only when the mean support location exceeds this."""
    mixture_factor: float = 1.0 / REFERENCE_MONEY_SCALE
    """The mixture logits see λ·this (unit-free, so revenue is unit-invariant)."""


@dataclass(frozen=True)
class Stage2Config:
    """Stage-2 training (the menu; flow frozen)."""

    steps: int = 30000
    """Most optimiser steps (``--max-steps`` overrides)."""
    max_time: float | None = None
    """Stop after this many seconds (``--max-time`` overrides)."""
    batch_size: int = 128
    """Valuations per step."""
    lr: float = 0.3
    """Adam lr of the support locations M and mixture logits w."""
    price_lr: float = 0.3 / REFERENCE_MONEY_SCALE
    """Adam lr of the prices (normalised money)."""
    seed: int = 0
    """Seed of the menu initialisation, noise and batches."""
    eval_every: int = 1000
    """Steps between validation evaluations."""
    patience: int | None = None
    """Stop after this many evaluations without a better validation revenue."""
    select_min_z: float = 1.96
    """bundleflow extension, with a fallback only: a trained menu replaces the untrained one
    (the first validation, at step 0) as the best only where its paired validation gain over
    the fallback alone is significant, z = mean(d)/SE(d) ≥ this (d: per-valuation payments
    minus the fallback's). Learned elements that only win by validation noise lost on test
    (BENCHMARKS.md "Revenue, issue 17, third pass"). 0: any higher validation revenue wins,
    as before. The price polish (``polish_rounds``) uses the same z for a round to replace
    the best one so far: its paired validation gain over that round's payments."""
    polish_rounds: int = 0
    """bundleflow extension: after training, rounds of exact coordinate ascent on the hard
    training revenue of the best menu's prices (``bundleflow.maths.polish``: each price moved to
    just below the marginal bidder's threshold that earns most, the lotteries fixed); the
    round with the best validation revenue is kept (round 0, the unpolished menu, included),
    so validation revenue never drops. Needs many training valuations (overfits at 4,500,
    +0.26% at 80,000 on CATS: BENCHMARKS.md). 0: off."""
    polish_soft_steps: int = 0
    """bundleflow extension, with ``polish_rounds``: after the coordinate rounds, park the
    elements no training bidder buys, run this many Adam steps on the prices alone of a
    sharp softmax revenue (the lotteries frozen; the best hard training revenue kept), then
    the coordinate rounds again; validation still picks the round. Moves several prices
    together along a ridge no single-price step climbs (additive U[4,16]×U[4,7]: 0.990 →
    0.9995 of the optimum; BENCHMARKS.md). 0: off."""
    polish_soft_temp: float = 0.003
    """Softmax temperature of that soft phase, in normalised money (× the data's money
    scale)."""
    polish_soft_lr: float = 0.0006
    """Adam lr of that soft phase, in normalised money."""
    log_every: int = 200
    """Steps between metric lines."""
    checkpoint_every: int = 5000
    """Steps between resumable checkpoints (Ctrl-C / SIGTERM also writes one). At paper size
    a checkpoint holds ~25 MB (menu and Adam state) and 5,000 steps are ~3.5 s on an H200.
    (Moving from 1,000 to 5,000 did not shorten paper-m50's Stage 2 on an H200: 28.2 s
    before, 29.5 / 30.5 s after — BENCHMARKS.md; fewer writes, the same time.)"""
    keep_checkpoints: int = 2
    """Resumable checkpoints kept (the best one is kept apart)."""
    path: str = "fast"
    """Integrator path: ``fast`` or ``reference``."""
    exact_density_grad: bool = False
    """Exact gradient of log N(z0; μ, σ) (the reference's has rounding error)."""
    step_mode: str = "auto"
    """``graph``: the whole step captured once in a CUDA graph and replayed (CUDA, XOR data,
    one process, fp32 or bf16: fp16 needs a gradient scaler; 6.5x faster Stage 2 for
    ``default`` on an H100); ``eager``; ``auto``: graph where it can run, else eager."""
    parallel: str = "shard"
    """Under several processes: ``shard`` (each rank owns J/N menu elements, their flow
    evaluations and utilities for the whole batch; the softmax over elements needs only
    all-reduces of [B]-sized vectors) or ``replicate`` (plain data parallelism: every rank
    holds the whole menu and a slice of the batch; gradients averaged). Same results either
    way up to float summation order; see BENCHMARKS.md for the scaling of each."""
    sync_every: int = 10
    """Steps between the ranks' agreement on stop signals (SIGTERM/SIGINT, --max-time) and
    the non-finite check; one host synchronisation per check."""
    tf32: bool = False
    """TF32 tensor cores for the flow network's fp32 matrix products (CUDA)."""
    kernels: str = "auto"
    """The fast path's per-point work: ``plain`` (autograd over elementwise operations),
    ``fused`` (three pointwise functions and a hand-written backward, eager), ``compiled``
    (those functions through torch.compile: one generated kernel each; falls back to
    ``plain`` if the compiler fails, with a warning) or ``auto`` (``compiled`` on CUDA with
    the flow network in bf16/fp16 — the CUDA default —, else ``plain``; see BENCHMARKS.md).
    The same numbers up to float rounding (bit for bit in fp32 on the CPU for ``fused``)."""
    inv_temp: InvTempConfig = field(default_factory=InvTempConfig)


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation of the frozen mechanism."""

    batch_size: int = 1024
    """Valuations per evaluation batch."""
    seed: int = 12345
    """Seed of the one noise draw that freezes the menu."""


@dataclass(frozen=True)
class Config:
    """A whole run."""

    name: str = "run"
    """Run name (the run directory is NAME-TIMESTAMP-ID)."""
    device: str = "auto"
    """``auto``, ``cuda``, ``cuda:N`` (GPU N of those torch sees), ``mps`` or ``cpu``."""
    mixed_precision: str | None = None
    """Precision of the flow network's matrix products (Stage 1 training, Stage 2 Q
    evaluation): ``no``, ``fp16`` or ``bf16``. Log-densities, bundles, utilities, softmax,
    prices and Adam always stay in fp32. ``null``: accelerate's setting (``accelerate launch
    --mixed_precision`` or its config file), else the measured default: bf16 for Stage 2's
    flow network on CUDA, fp32 for everything else (``bundleflow.train.plan``)."""
    data: DataConfig = field(default_factory=DataConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    menu: MenuConfig = field(default_factory=MenuConfig)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    eval: EvalConfig = field(default_factory=EvalConfig)


def to_dict(config: Any) -> dict:
    """Nested plain dict (tuples become lists) — what run directories record."""
    out = {}
    for f in fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            value = to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def to_flat_dict(config: Any) -> dict:
    """``{"stage2.lr": 0.3, ...}``: dotted keys, as ``--set`` takes them."""
    flat: dict = {}

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                flat[prefix + key] = value

    walk(to_dict(config), "")
    return flat


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def preset_path(name_or_path: str) -> Path:
    """``configs/NAME.yaml`` for a bare name, else the given path."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") or candidate.exists():
        if not candidate.is_file():
            raise BundleflowError(f"{candidate}: preset file not found")
        return candidate
    path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        names = preset_names()
        if not names:
            raise BundleflowError(
                f"unknown preset {name_or_path!r}: no presets found in {CONFIG_DIR} (this "
                "bundleflow was installed without them; reinstall it) — or pass a path to a .yaml"
            )
        raise BundleflowError(
            f"unknown preset {name_or_path!r}; presets: {', '.join(names)} (or a path to a .yaml)"
        )
    return path


def preset_names() -> list[str]:
    """The names ``--preset`` accepts, sorted."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def preset_description(path: Path) -> str:
    """A preset file's first line if it is a comment (each preset starts with one saying what
    it is), else ``""``."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            return line.lstrip("#").strip() if line.startswith("#") else ""
    return ""


class _Loader(yaml.SafeLoader):
    """YAML with YAML 1.2 floats: PyYAML (YAML 1.1) reads ``1e-3`` as a *string*, which would
    reject ``--set stage2.lr=1e-3``; here a mantissa without a dot is a float too."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # safe: a SafeLoader subclass


def _one_line(err: BaseException) -> str:
    """A YAML error (several lines, with a caret drawing) as one line for the CLI."""
    return " ".join(str(err).split()) or type(err).__name__


def read_yaml_mapping(path: Path) -> dict:
    try:
        data = _yaml_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, ValueError, RecursionError) as err:  # ValueError: not UTF-8
        raise BundleflowError(f"{path}: not valid YAML ({_one_line(err)})") from None
    except OSError as err:
        raise BundleflowError(f"{path}: cannot read ({err.strerror})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise BundleflowError(f"{path}: a preset must be a mapping of config keys")
    return data


def parse_set(items: list[str] | None) -> dict:
    """``["a.b=3", "c=[1, 2]"]`` -> nested dict with YAML-parsed values."""
    out: dict = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise BundleflowError(f"--set {item!r}: expected KEY=VALUE, e.g. --set menu.size=2000")
        try:
            value = _yaml_load(text)
        except (yaml.YAMLError, ValueError, RecursionError) as err:
            raise BundleflowError(
                f"--set {item!r}: value is not valid YAML ({_one_line(err)})"
            ) from None
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise BundleflowError(f"--set {item!r}: {part!r} is not a section")
        node[parts[-1]] = value
    return out


def from_dict(values: dict) -> Config:
    """Build and validate a :class:`Config` from a nested dict of overrides."""
    config = build(Config, values)
    check_values(config, to_flat_dict(config))
    return config


def load_config(preset: str | None = None, overrides: dict | None = None) -> Config:
    """Defaults < preset < overrides, validated."""
    values: dict = {}
    if preset:
        values = read_yaml_mapping(preset_path(preset))
    if overrides:
        values = _deep_merge(values, overrides)
    return from_dict(values)


def replace(config: Config, **changes: dict) -> Config:
    """A copy with sections updated: ``replace(cfg, stage2={"steps": 10})``."""
    return from_dict(_deep_merge(to_dict(config), changes))
