"""`bundleflow bench`: the Stage-2 step, fast path against reference path, side by side.

A step (issue 7): fresh noise ε, Q at all J·D support points, bundles recomputed, the value
oracle on a fresh batch, backward, optimizer step — nothing cached across steps. Both paths
train their own copy of the same initial menu on the same synthetic CATS-like XOR pool:

- ``fast``: :class:`bundleflow.train.stage2_step.Stage2Step` (Q once per point, closed-form Euler,
  bf16 inclusion mask on CUDA, fused Adam; CUDA-graph captured by default on CUDA).
- ``reference``: the public code's numerics: N network calls per point, fp16 autocast with
  a GradScaler on CUDA (float32 on CPU), plain Adam. It shares bundleflow's value oracle,
  so the ratio measures the integrator, precision and launch overheads, not the oracle.

Before timing, each path makes one step whose loss, bundles and gradients are compared
with the float32 reference computation on the same ε, batch and parameters; a path that
fails is not timed. Then both paths are timed interleaved (drift hits both alike).
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass

import torch
from loguru import logger
from torch import Tensor

from bundleflow.evaluation.mechanism import FrozenMechanism
from bundleflow.maths.flow import VelocityField, default_hidden_sizes
from bundleflow.maths.fused import resolve_kernels
from bundleflow.maths.menu import Menu, freeze_flow
from bundleflow.maths.schedule import REFERENCE_INITIAL
from bundleflow.perf.profiling import environment, peak_memory
from bundleflow.system.timing import step_stats, synchronize
from bundleflow.train.stage2_step import (
    Stage2Step,
    StepOptions,
    make_optimizer,
    stage2_loss,
    tf32_matmul,
)

# Parity tolerances by precision: relative loss difference, max |Δgrad| / max |grad| per
# parameter, and the fraction of bundle entries that may differ (an entry flips when its
# z_N is within rounding of 0.5).
TOLERANCES = {
    "fp32": {"loss_rel": 1e-5, "grad_rel": 1e-3, "bundle_frac": 1e-5},
    "fp16": {"loss_rel": 2e-2, "grad_rel": 0.25, "bundle_frac": 1e-2},
}
# The fast path's flow network in TF32 or bf16 is held to the tolerance of the public code's
# own fp16 numerics (the anchor every published timing and revenue was measured in); the
# report shows both paths' measured deviations from float32 side by side (at m=500 on an
# H200: TF32 3.6e-2 and bf16 0.23 of the largest gradient entry, the public code 0.12).
TOLERANCES["tf32"] = TOLERANCES["bf16"] = TOLERANCES["fp16"]
PRECISIONS = ("fp32", "tf32", "bf16")
LR = 0.3  # the reference's single Adam learning rate (raw money units here)
PRICE_SCALE = 700.0  # raw CATS-like money: prices U[0, 700)
INV_TEMP = MIX_TEMP = REFERENCE_INITIAL  # the reference's initial λ
BENCH_STATS = ("median", "p10", "p90", "min", "max", "steps")  # each path's step times


@dataclass
class BenchConfig:
    items: int = 50
    menu: int = 5000
    support: int = 8
    batch: int = 128
    atoms: int = 6
    steps: int = 50
    warmup: int = 5
    n_steps: int = 5
    pool: int = 4096
    eval_valuations: int = 1000
    eval_repeats: int = 10
    mode: str = "auto"
    precision: str = "fp32"  # the fast path's flow network: fp32, tf32 or bf16 (CUDA)
    kernels: str = "auto"  # the fast path's per-point work (stage2.kernels)
    seed: int = 0


def synthetic_xor(n: int, k: int, m: int, gen: torch.Generator) -> Tensor:
    """XOR valuations shaped like CATS ones: K atoms of equal size ≈ 1 + geometric(0.1)."""
    out = torch.zeros(n, k, m + 1)
    u = torch.rand(n, generator=gen).clamp_min(1e-12)
    size = (1 + torch.floor(torch.log(u) / torch.log(torch.tensor(0.9)))).clamp(1, m).long()
    scores = torch.rand(n, k, m, generator=gen)
    ranks = scores.argsort(dim=-1).argsort(dim=-1)  # a random permutation per atom
    out[..., :m] = (ranks < size[:, None, None]).float()
    out[..., m] = 100 * size[:, None].float() + 100 * torch.rand(n, k, generator=gen)
    return out


class ReferenceStep:
    """The public code's step: N network calls; fp16 autocast + GradScaler on CUDA; Adam."""

    def __init__(self, menu: Menu, flow: VelocityField, pool: Tensor, batch_size: int, n_steps):
        self.menu, self.flow, self.pool = menu, flow, pool
        self.batch_size, self.n_steps = batch_size, n_steps
        self.device = menu.means.device
        self.cuda = self.device.type == "cuda"
        self.optimizer = torch.optim.Adam(menu.parameters(), lr=LR)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.cuda)
        self.last_eps = self.last_batch = self.last_bundles = None
        self.precision = (
            "fp16 autocast + GradScaler (as the public code ships)" if self.cuda else "float32"
        )

    def __call__(self, inv_temp: float, mix_temp: float) -> Tensor:
        index = torch.randint(self.pool.shape[0], (self.batch_size,), device=self.device)
        eps, batch = self.menu.draw_noise(), self.pool[index]
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.cuda):
            loss, bundles = stage2_loss(
                self.menu, self.flow, batch, inv_temp, mix_temp, eps,
                n_steps=self.n_steps, path="reference",
            )  # fmt: skip
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)  # unscales .grad in place first
        self.scaler.update()
        self.last_eps, self.last_batch, self.last_bundles = eps, batch, bundles
        return loss.detach()


def parity_step(step, menu: Menu, flow: VelocityField, tolerance: dict, n_steps: int) -> dict:
    """Make one step of ``step`` and compare it with the float32 reference computation on the
    same ε, batch and parameters (those before the step)."""
    before = copy.deepcopy(menu)
    loss = float(step(INV_TEMP, MIX_TEMP))
    grads = [p.grad.detach().clone() for p in menu.parameters()]
    bundles = step.last_bundles.detach().clone()
    before.zero_grad(set_to_none=True)
    with tf32_matmul(False):
        ref_loss, ref_bundles = stage2_loss(
            before, flow, step.last_batch, INV_TEMP, MIX_TEMP, step.last_eps,
            n_steps=n_steps, path="reference",
        )  # fmt: skip
        ref_loss.backward()
    ref_grads = [p.grad for p in before.parameters()]
    ref = float(ref_loss.detach())
    grad_rel = max(
        float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
        for a, b in zip(grads, ref_grads, strict=True)
    )
    result = {
        "loss": loss,
        "reference_loss_fp32": ref,
        "loss_rel_diff": abs(loss - ref) / max(abs(ref), 1e-30),
        "bundles_differing": int((bundles != ref_bundles).sum()),
        "bundle_entries": int(ref_bundles.numel()),
        "grad_max_rel_diff": grad_rel,
        "tolerance": tolerance,
    }
    finite = all(bool(torch.isfinite(g).all()) for g in grads) and abs(loss) < float("inf")
    result["ok"] = bool(
        finite
        and result["loss_rel_diff"] <= tolerance["loss_rel"]
        and grad_rel <= tolerance["grad_rel"]
        and result["bundles_differing"] <= tolerance["bundle_frac"] * result["bundle_entries"]
    )
    return result


def build(cfg: BenchConfig, device: torch.device):
    """Flow, the initial menu and the valuation pool (all seeded)."""
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    h, h2 = default_hidden_sizes(cfg.items)
    flow = freeze_flow(VelocityField(cfg.items, h, h2)).to(device)
    menu = Menu(cfg.items, cfg.menu, cfg.support, generator=gen, price_scale=PRICE_SCALE)
    pool = synthetic_xor(cfg.pool, cfg.atoms, cfg.items, gen).to(device)
    eval_vals = synthetic_xor(cfg.eval_valuations, cfg.atoms, cfg.items, gen).to(device)
    return flow, menu.to(device), pool, eval_vals


def make_steps(cfg: BenchConfig, flow, menu: Menu, pool: Tensor) -> dict:
    fast_menu, ref_menu = menu, copy.deepcopy(menu)
    kernels = resolve_kernels(cfg.kernels, pool.device, cfg.precision == "bf16")
    params = [{"params": list(fast_menu.parameters()), "lr": LR}]
    opt = make_optimizer(fast_menu, params, cfg.mode, kernels=kernels)
    options = StepOptions(
        cfg.batch, n_steps=cfg.n_steps, mode=cfg.mode, tf32=cfg.precision == "tf32",
        q_dtype=torch.bfloat16 if cfg.precision == "bf16" else None, warmup=min(3, cfg.warmup),
        kernels=kernels,
    )  # fmt: skip
    fast = Stage2Step(fast_menu, flow, opt, pool, options)
    ref = ReferenceStep(ref_menu, flow, pool, cfg.batch, cfg.n_steps)
    return {"fast": (fast, fast_menu), "reference": (ref, ref_menu)}


def path_precision_key(name: str, step, device: torch.device) -> str:
    if name == "reference":
        return "fp16" if device.type == "cuda" else "fp32"
    if getattr(step, "q_dtype", None) == torch.bfloat16:
        return "bf16"
    return "tf32" if getattr(step, "tf32", False) else "fp32"


def time_eval(cfg: BenchConfig, menu: Menu, flow, eval_vals: Tensor, device) -> dict:
    """Hard evaluation of a frozen mechanism: utilities, argmax and payments, all valuations."""
    mech = FrozenMechanism.freeze(menu, flow, MIX_TEMP, n_steps=cfg.n_steps)
    n = eval_vals.shape[0]
    times = []
    for i in range(cfg.eval_repeats + 2):
        synchronize(device)
        t0 = time.perf_counter()
        mech.outcome(eval_vals, batch_size=n)
        synchronize(device)
        if i >= 2:  # two warm-up evaluations
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {
        "valuations": n,
        "median_ms": round(med * 1e3, 4),
        "min_ms": round(min(times) * 1e3, 4),
        "valuations_per_s": round(n / med, 1),
        "repeats": len(times),
    }


def run_bench(cfg: BenchConfig, device: torch.device, steps_override: dict | None = None) -> dict:
    """Parity, warm-up and interleaved timing of both paths; hard-evaluation throughput.

    ``steps_override`` replaces a path's step callable (tests use it to break a path).
    """
    flow, menu, pool, eval_vals = build(cfg, device)
    paths = make_steps(cfg, flow, menu, pool)
    for name, fn in (steps_override or {}).items():
        paths[name] = (fn(paths[name][0]), paths[name][1])
    report: dict = {
        "shape": {
            "items": cfg.items, "menu": cfg.menu, "support": cfg.support,
            "batch": cfg.batch, "atoms": cfg.atoms, "euler_steps": cfg.n_steps,
        },
        "environment": environment(device),
    }  # fmt: skip
    for name, (step, path_menu) in paths.items():
        report[name] = warm_up_and_check(cfg, name, step, path_menu, flow, device)
    timed = [name for name in paths if report[name]["parity"]["ok"]]
    times = time_interleaved({name: paths[name][0] for name in timed}, cfg.steps, device)
    for name in paths:
        stats = step_stats(times[name], BENCH_STATS, 4) if name in times else {"median_ms": None}
        report[name].update(stats)
    f, r = report["fast"]["median_ms"], report["reference"]["median_ms"]
    report["ratio"] = round(r / f, 3) if f and r else None
    report["parity_ok"] = all(report[n]["parity"]["ok"] for n in paths)
    report["eval"] = time_eval(cfg, paths["fast"][1], flow, eval_vals, device)
    report["steps"] = cfg.steps
    report["warmup"] = cfg.warmup
    if device.type != "cuda":
        report["process_max_rss_gib"] = peak_memory(device).get("process_max_rss_gib")
    return report


def warm_up_and_check(cfg: BenchConfig, name: str, step, path_menu: Menu, flow, device) -> dict:
    """One path's report entry before timing: its precision, warm-up time (compilation
    included), the parity step and the peak memory so far."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    entry: dict = {"precision": step.precision}
    if name == "fast":
        entry["mode"] = step.mode
        entry["kernels"] = step.kernel_mode
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(cfg.warmup):
        step(INV_TEMP, MIX_TEMP)
    synchronize(device)
    entry["warmup_s"] = round(time.perf_counter() - t0, 3)  # includes any compilation
    key = path_precision_key(name, step, device)
    entry["parity"] = parity_step(step, path_menu, flow, TOLERANCES[key], cfg.n_steps)
    if name == "fast" and getattr(step, "eager_reason", None):
        entry["fallback"] = step.eager_reason  # the JSON key users read: unchanged
    synchronize(device)
    entry["peak_memory_gib"] = peak_memory(device).get("cuda_max_allocated_gib")
    if not entry["parity"]["ok"]:
        logger.error("{} path failed the parity check, not timed: {}", name, entry["parity"])
    return entry


def time_interleaved(steps: dict, n: int, device: torch.device) -> dict[str, list[float]]:
    """``n`` timed steps of each path, interleaved so that drift hits every path alike."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(n):
        for name, step in steps.items():
            synchronize(device)
            t0 = time.perf_counter()
            step(INV_TEMP, MIX_TEMP)
            synchronize(device)
            times[name].append(time.perf_counter() - t0)
    return times


def format_text(report: dict) -> str:
    s = report["shape"]
    env = report["environment"]
    lines = [
        f"bench: m={s['items']} J={s['menu']} D={s['support']} B={s['batch']} K={s['atoms']} "
        f"on {env['device_name']} (torch {env['torch']}, CUDA {env['cuda']})",
    ]
    for name in ("fast", "reference"):
        e = report[name]
        p = e["parity"]
        med = "not timed (parity failed)" if e["median_ms"] is None else (
            f"median {e['median_ms']:.3f} ms [p10 {e['p10_ms']:.3f}, p90 {e['p90_ms']:.3f}]"
        )  # fmt: skip
        lines.append(
            f"  {name:9s} {med}; {e['precision']}"
            + (f"; mode {e['mode']}" if "mode" in e else "")
            + (f" (fell back to eager: {e['fallback']})" if "fallback" in e else "")
            + f"; parity {'ok' if p['ok'] else 'FAILED'} (loss rel {p['loss_rel_diff']:.1e}, "
            f"grad rel {p['grad_max_rel_diff']:.1e}, bundles differing "
            f"{p['bundles_differing']}/{p['bundle_entries']})"
            + (f"; peak {e['peak_memory_gib']} GiB" if e["peak_memory_gib"] is not None else "")
        )
    if report["ratio"]:
        lines.append(f"  ratio reference/fast: {report['ratio']:.2f}x")
    ev = report["eval"]
    lines.append(
        f"  hard evaluation: {ev['valuations']} valuations in {ev['median_ms']:.3f} ms "
        f"({ev['valuations_per_s']:.0f} valuations/s)"
    )
    if "target_ms" in report:
        verdict = "met" if report["target_met"] else "MISSED"
        lines.append(f"  target {report['target_ms']} ms: {verdict}")
    return "\n".join(lines)
