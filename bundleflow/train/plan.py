"""How the steps run, decided once: Stage 2's precision, step mode, kernels and parallel
layout, and Stage 1's step (:func:`stage1_mode`).

`bundleflow train` records the answer in run.json (``step_plan``) and runs it; `bundleflow
profile` and `bundleflow bench` time the step this answer describes. Each choice carries
the reason it was made (the user's setting, the launcher, the hardware, a measurement).

What only running can tell is added after the run: where ``torch.compile`` (the compiled
kernels, a compiled step, compiled Adam) failed, the step ran eager — typically 2× slower
on CUDA (issue 25: no C compiler or no Python headers for Triton's launcher). That is a
finding with its fix (:data:`COMPILER_FIX`), recorded in the plan and shown in the report,
not only a log line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch

from bundleflow.errors import BundleflowError
from bundleflow.maths.fused import resolve_kernels
from bundleflow.train.config import Config

MIXED_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
COMPILER_FIX = (
    "install a C compiler and the Python headers (apt-get install gcc g++ python3-dev: "
    "Triton and inductor build their kernels with them at run time), or run in the "
    "bundleflow image"
)
"""The fix for a failed ``torch.compile`` (the run went eager), as the report states it."""


@dataclass(frozen=True)
class Choice:
    value: str
    reason: str


@dataclass(frozen=True)
class StepPlan:
    """The resolved step: what runs, and why."""

    device: torch.device
    precision: Choice  # of the flow network's matrix products: no | bf16 | fp16
    step_mode: Choice  # graph | eager
    kernels: Choice  # plain | fused | compiled
    parallel: Choice  # single | shard | replicate
    processes: int = 1
    stage1: Choice | None = None  # graph | eager | ddp: Stage 1's step (stage1_mode)
    compile_failed: tuple[str, ...] = ()  # what ran eager after torch.compile failed, and why

    @property
    def q_dtype(self) -> torch.dtype | None:
        """The flow network's dtype in Stage 2 (None: float32)."""
        if self.precision.value == "fp16" and self.device.type == "cpu":
            return None  # no fp16 matmuls on the CPU
        return MIXED_DTYPES.get(self.precision.value)

    @property
    def eager(self) -> dict | None:
        """The finding when compilation failed and the step ran eager: ``{"status": "eager",
        "why": ..., "fix": ...}``; None when nothing failed to compile."""
        if not self.compile_failed:
            return None
        return {"status": "eager", "why": "; ".join(self.compile_failed), "fix": COMPILER_FIX}

    def after_run(self, *parts: object) -> StepPlan:
        """This plan with what the run learned: each of ``parts`` (the step, the optimizer)
        whose ``eager_reason`` says its compilation failed adds that reason."""
        found = list(self.compile_failed)
        for part in parts:
            reason = getattr(part, "eager_reason", None)
            if reason:
                # one line, without dynamo's advice on debugging itself
                reason = " ".join(str(reason).split("Set TORCHDYNAMO_VERBOSE")[0].split())
                if reason not in found:
                    found.append(reason)
        return replace(self, compile_failed=tuple(found))

    def to_dict(self) -> dict:
        out: dict = {"device": str(self.device), "processes": self.processes}
        for name in ("precision", "step_mode", "kernels", "parallel"):
            choice = getattr(self, name)
            out[name] = {"value": choice.value, "reason": choice.reason}
        if self.stage1 is not None:
            out["stage1"] = {"value": self.stage1.value, "reason": self.stage1.reason}
        if self.eager is not None:
            out["eager"] = self.eager
        return out

    def describe(self) -> str:
        """One line for the log."""
        line = "; ".join(
            f"{name.replace('_', ' ')} {getattr(self, name).value} ({getattr(self, name).reason})"
            for name in ("precision", "step_mode", "kernels", "parallel")
        )
        if self.eager is not None:
            line += f"; ran eager: {self.eager['why']} (fix: {COMPILER_FIX})"
        return line


def stage2_precision(configured: str | None, device: torch.device) -> tuple[str, str]:
    """(precision of the flow network in Stage 2, where the choice came from).

    ``--mixed-precision`` / ``mixed_precision`` > a real choice made through ``accelerate
    launch --mixed_precision`` or its config file (ACCELERATE_MIXED_PRECISION=fp16|bf16) >
    the measured default: bf16 on CUDA (on an H200: 10% faster steps at m=50, 27% at m=500,
    no test bidder choosing differently on a frozen paper-m50 menu, validation revenue over 3
    seeds not lower; BENCHMARKS.md), fp32 elsewhere. Stage 1, freezing, validation and the
    report stay fp32 unless set explicitly.

    ``accelerate launch`` exports ACCELERATE_MIXED_PRECISION on every launch, ``no`` when
    neither its flag nor its config file chose anything (and ``no`` is what ``accelerate
    config`` writes by default), so ``no`` from there is not a choice: it keeps the measured
    default. ``--mixed-precision no`` (or ``--set mixed_precision=no``) asks for fp32.
    """
    if configured is not None:
        return configured, "bundleflow mixed_precision"
    launched = (os.environ.get("ACCELERATE_MIXED_PRECISION") or "").strip().lower()
    if launched in ("fp16", "bf16"):
        return launched, "accelerate (ACCELERATE_MIXED_PRECISION)"
    default = "bf16" if device.type == "cuda" else "no"
    if launched:
        return default, (
            f"default for {device.type}; accelerate's mixed_precision={launched!r} is its "
            "default, not a choice (--mixed-precision no for fp32)"
        )
    return default, "default for " + device.type


def graph_unavailable(
    device: torch.device, has_pool: bool, processes: int, precision: str | None
) -> str | None:
    """Why the CUDA-graph step cannot run here, or None when it can."""
    if device.type != "cuda":
        return f"the device is {device.type}, not CUDA"
    if not has_pool:
        return "additive runs draw fresh valuations (no device-resident pool)"
    if processes > 1:
        return "several processes (use eager under accelerate launch)"
    if precision == "fp16":
        return "fp16 needs a gradient scaler (use bf16 or eager)"
    return None


def stage1_mode(device: torch.device, processes: int, mixed_precision: str | None) -> Choice:
    """Stage 1's step: the whole step in a CUDA graph (one process, fp32, CUDA), eager (one
    process elsewhere), or ``ddp``: through Accelerate's prepared model, for several
    processes or a mixed precision chosen explicitly (``mixed_precision`` as the Accelerator
    has it: the flag, the config or ``accelerate launch``). The trainer, the plan in run.json
    and ``bundleflow profile`` all take this answer."""
    if processes > 1:
        return Choice("ddp", f"{processes} processes: DDP through Accelerate's prepared model")
    if mixed_precision in ("fp16", "bf16"):
        return Choice("ddp", f"mixed_precision={mixed_precision}: Accelerate's autocast")
    if device.type == "cuda":
        return Choice("graph", "one process, fp32, CUDA: the whole step in a CUDA graph")
    return Choice("eager", f"one process on {device.type}")


def resolve_plan(
    cfg: Config, device: torch.device, *, processes: int = 1, has_pool: bool = True
) -> StepPlan:
    """The step `bundleflow train` runs for ``cfg`` on ``device`` with ``processes``
    processes. ``has_pool``: the training valuations live on the device (XOR data; additive
    runs draw fresh ones). A setting that cannot run here is a user error naming its key."""
    s2 = cfg.stage2
    value, source = stage2_precision(cfg.mixed_precision, device)
    precision = Choice(value, source)
    why_not = graph_unavailable(device, has_pool, processes, value)
    if s2.step_mode == "graph" and why_not is not None:
        raise BundleflowError(f"config key 'stage2.step_mode': graph is unavailable: {why_not}")
    if s2.step_mode == "eager":
        mode = Choice("eager", "stage2.step_mode=eager")
    elif why_not is None:
        mode = Choice("graph", f"stage2.step_mode={s2.step_mode}: CUDA, one process, a pool")
    else:
        mode = Choice("eager", why_not)
    low = value in ("bf16", "fp16")
    if s2.path != "fast":
        kernels = Choice("plain", f"stage2.path={s2.path}")
    elif cfg.menu.bundle_grad != "none":
        kernels = Choice("plain", f"menu.bundle_grad={cfg.menu.bundle_grad}")
    elif cfg.menu.lottery_weights != "density":  # the fused kernels compute density weights
        kernels = Choice("plain", f"menu.lottery_weights={cfg.menu.lottery_weights}")
    elif s2.kernels != "auto":
        kernels = Choice(resolve_kernels(s2.kernels, device, low), f"stage2.kernels={s2.kernels}")
    else:
        chosen = resolve_kernels("auto", device, low)
        why = "CUDA with a bf16/fp16 flow network" if chosen == "compiled" else (
            "fp32 flow network" if device.type == "cuda" else f"on {device.type}"
        )  # fmt: skip
        kernels = Choice(chosen, f"stage2.kernels=auto: {why}")
    if processes > 1:
        parallel = Choice(s2.parallel, f"stage2.parallel={s2.parallel}, {processes} processes")
    else:
        parallel = Choice("single", "one process")
    launched = (os.environ.get("ACCELERATE_MIXED_PRECISION") or "").strip().lower()
    stage1 = stage1_mode(device, processes, cfg.mixed_precision or launched or None)
    return StepPlan(device, precision, mode, kernels, parallel, processes, stage1=stage1)
