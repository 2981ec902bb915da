"""`bundleflow profile`: where a training step's time goes.

For each stage profiled (Stage 2, optionally Stage 1 first): warm-up steps, then N steps
timed one by one (synchronised; GPU utilisation sampled through NVML meanwhile), then the
same number of steps under ``torch.profiler``. The step is the trainer's own: the menu,
optimiser and λ schedule come from ``bundleflow.train.stage2`` (build_menu, build_optimizer,
build_schedule), the batches from the run's data, the flow is randomly initialised (or the
Stage-1 steps just profiled), because a step's cost does not depend on the flow's weights.

Writes to the output directory: ``trace.json`` (Chrome trace of the Stage-2 steps; open in
https://ui.perfetto.dev or chrome://tracing), ``trace-stage1.json``, ``profile.md`` (top
operators by self CPU and device time, step-time median/p90, peak memory, GPU utilisation)
and ``profile.json`` (the same numbers).
"""

from __future__ import annotations

import contextlib
import json
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from loguru import logger

from bundleflow.system.timing import step_stats, synchronize
from bundleflow.train.config import Config, to_dict

if TYPE_CHECKING:
    from bundleflow.train.plan import StepPlan

TRACE = "trace.json"
TRACE_STAGE1 = "trace-stage1.json"
REPORT_MD = "profile.md"
REPORT_JSON = "profile.json"
SAMPLE_INTERVAL_S = 0.05
# NVML's utilisation is the share of its last sample period (1/6 s to 1 s, depending on the
# GPU) with a kernel running: on a GPU the timed phase lasts at least MIN_SAMPLED_S, and
# samples of its first SETTLE_S (still covering the idle time before it) are dropped.
MIN_SAMPLED_S = 3.0
SETTLE_S = 1.0


# --------------------------------------------------------------------------- GPU sampling


class GpuSampler:
    """Samples the GPU's utilisation and memory through NVML in a background thread.

    A no-op on anything but CUDA, or when NVML is unavailable (``available`` is False)."""

    def __init__(self, device: torch.device, interval: float = SAMPLE_INTERVAL_S):
        self.device = device
        self.interval = interval
        self.util: list[tuple[float, int]] = []  # (time, percent)
        self.memory_used: list[int] = []
        self.started = time.monotonic()
        self.available = False
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> GpuSampler:
        if self.device.type != "cuda":
            self.error = f"no GPU ({self.device.type})"
            return self
        try:
            import pynvml

            from bundleflow.system.telemetry import nvml_handle

            pynvml.nvmlInit()
        except Exception as err:  # noqa: BLE001 - no NVML: run on without sampling
            self.error = f"NVML unavailable: {type(err).__name__}"
            return self
        index = self.device.index if self.device.index is not None else 0
        try:
            uuid = str(getattr(torch.cuda.get_device_properties(index), "uuid", "") or "")
            handle = nvml_handle(pynvml, index, uuid)
        except Exception as err:  # noqa: BLE001
            self.error = f"NVML has no handle for cuda:{index}: {err}"
            with contextlib.suppress(Exception):
                pynvml.nvmlShutdown()
            return self
        self.available = True
        self.started = time.monotonic()
        self._thread = threading.Thread(
            target=self._run, args=(pynvml, handle), name="nvml-sampler", daemon=True
        )
        self._thread.start()
        return self

    def _run(self, pynvml, handle) -> None:
        try:
            while not self._stop.is_set():
                with contextlib.suppress(Exception):
                    util = int(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
                    self.util.append((time.monotonic(), util))
                    self.memory_used.append(int(pynvml.nvmlDeviceGetMemoryInfo(handle).used))
                self._stop.wait(self.interval)
        finally:
            with contextlib.suppress(Exception):
                pynvml.nvmlShutdown()

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def summary(self, settle: float = SETTLE_S) -> dict | None:
        if not self.available or not self.util:
            return None
        settled = [u for t, u in self.util if t - self.started >= settle]
        util = settled or [u for _, u in self.util]
        return {
            "mean_percent": round(statistics.fmean(util), 1),
            "median_percent": statistics.median(util),
            "max_percent": max(util),
            "samples": len(util),
            "interval_s": self.interval,
            "memory_used_max_gib": round(max(self.memory_used) / 2**30, 2)
            if self.memory_used
            else None,
        }


# --------------------------------------------------------------------------- measuring


def _device_time(event) -> float:
    """Self device time (µs) of a profiler event average; the name changed in torch 2.4+."""
    for attr in ("self_device_time_total", "self_cuda_time_total"):
        value = getattr(event, attr, None)
        if value is not None:
            return float(value)
    return 0.0


def _device_memory(event) -> float:
    for attr in ("self_device_memory_usage", "self_cuda_memory_usage"):
        value = getattr(event, attr, None)
        if value is not None:
            return float(value)
    return 0.0


def operator_rows(prof, steps: int) -> list[dict]:
    """Per-step figures of every CPU operator and GPU kernel the profiler recorded.

    The GPU timeline also carries annotations (``Optimizer.step#Adam.step``, spanning its
    kernels); they share the key of a CPU event and are left out, not counted twice."""
    events = list(prof.key_averages())
    on_cpu = {e.key for e in events if "CPU" in str(getattr(e, "device_type", "CPU"))}
    rows = []
    for e in events:
        kind = "op" if "CPU" in str(getattr(e, "device_type", "CPU")) else "kernel"
        if kind == "kernel" and (e.key in on_cpu or getattr(e, "is_user_annotation", False)):
            continue
        rows.append(
            {
                "name": e.key,
                "kind": kind,
                "calls_per_step": round(e.count / steps, 2),
                "self_cpu_ms": e.self_cpu_time_total / 1e3 / steps,
                "self_device_ms": _device_time(e) / 1e3 / steps,
                "self_cpu_memory_mib": e.self_cpu_memory_usage / 2**20 / steps,
                "self_device_memory_mib": _device_memory(e) / 2**20 / steps,
            }
        )
    return rows


def top(rows: list[dict], key: str, n: int) -> list[dict]:
    total = sum(r[key] for r in rows) or 1.0
    chosen = sorted((r for r in rows if r[key] > 0), key=lambda r: -r[key])[:n]
    return [{**r, "share": r[key] / total} for r in chosen]


@dataclass
class StageProfile:
    name: str
    timing: dict
    profiled_timing: dict
    top_cpu: list[dict]
    top_device: list[dict]
    total_self_cpu_ms: float
    total_self_device_ms: float
    gpu_utilization: dict | None
    peak_memory: dict
    trace: str
    notes: list[str] = field(default_factory=list)


def measure(
    name: str,
    step: Callable[[], None],
    device: torch.device,
    *,
    warmup: int,
    steps: int,
    top_n: int,
    trace_path: Path,
) -> StageProfile:
    """Warm-up, N timed steps (NVML sampling meanwhile), N steps under torch.profiler."""
    from torch.profiler import ProfilerActivity, profile, record_function

    for _ in range(warmup):
        step()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = []
    with GpuSampler(device) as sampler:
        began = time.perf_counter()
        while len(seconds) < steps or (
            sampler.available and time.perf_counter() - began < MIN_SAMPLED_S
        ):
            start = time.perf_counter()
            step()
            synchronize(device)
            seconds.append(time.perf_counter() - start)
    peak = peak_memory(device)
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    profiled = []
    with profile(activities=activities, profile_memory=True, record_shapes=False) as prof:
        for i in range(steps):
            start = time.perf_counter()
            with record_function(f"{name} step {i}"):
                step()
                synchronize(device)
            profiled.append(time.perf_counter() - start)
    prof.export_chrome_trace(str(trace_path))
    rows = [r for r in operator_rows(prof, steps) if not r["name"].startswith(f"{name} step")]
    kernels = [r for r in rows if r["kind"] == "kernel"]  # GPU work: kernels, copies, sets
    notes = []
    if device.type == "cuda" and not sampler.available:
        notes.append(f"GPU utilisation not sampled: {sampler.error}")
    return StageProfile(
        name=name,
        timing=step_stats(seconds),
        profiled_timing=step_stats(profiled),
        top_cpu=top([r for r in rows if r["kind"] == "op"], "self_cpu_ms", top_n),
        top_device=top(kernels, "self_device_ms", top_n) if device.type == "cuda" else [],
        total_self_cpu_ms=sum(r["self_cpu_ms"] for r in rows),
        total_self_device_ms=sum(r["self_device_ms"] for r in kernels),
        gpu_utilization=sampler.summary(),
        peak_memory=peak,
        trace=trace_path.name,
        notes=notes,
    )


def peak_memory(device: torch.device) -> dict:
    """Peak memory of the timed steps: the CUDA caching allocator's peaks on a GPU, the
    process's peak resident set on the CPU (whole process, start-up and data included)."""
    out: dict = {}
    if device.type == "cuda":
        out["cuda_max_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
        out["cuda_max_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 3)
    with contextlib.suppress(Exception):
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
        out["process_max_rss_gib"] = round(rss * scale / 2**30, 3)
    return out


# --------------------------------------------------------------------------- the steps


def stage1_step(cfg: Config, n_items: int, device: torch.device, accelerator, calls: int):
    """The Stage-1 step `bundleflow train` runs (the same trainer, the same
    :func:`bundleflow.train.plan.stage1_mode` answer: a CUDA graph on one GPU, DDP or
    autocast through Accelerate otherwise), sized for ``calls`` steps; returns (step, field):
    the field is trained by the steps, for Stage 2 afterwards."""
    from dataclasses import replace

    from bundleflow.train.stage1 import Stage1Trainer

    stage1 = replace(cfg.stage1, steps=calls)  # the step's history holds every call
    trainer = Stage1Trainer(
        n_items, cfg.flow, stage1, device, accelerator=accelerator, show_progress=False
    )
    logger.info("profile: Stage 1 step {} ({})", trainer.mode.value, trainer.mode.reason)
    return trainer.step, trainer.net


def stage2_step(cfg: Config, flow, data, device: torch.device):
    """The Stage-2 step `bundleflow train` runs with this config on this device (the same
    :func:`bundleflow.train.plan.resolve_plan` answer), as a closure; and that plan."""
    from bundleflow.train.plan import resolve_plan
    from bundleflow.train.stage2 import Stage2Trainer

    plan = resolve_plan(cfg, device, has_pool=data.train is not None)
    trainer = Stage2Trainer(cfg, flow, data, plan)  # no run directory: steps only
    return trainer.step, plan


# --------------------------------------------------------------------------- the job


def run_profile(
    cfg: Config,
    device: torch.device,
    out: Path,
    *,
    steps: int = 20,
    warmup: int = 5,
    stage1_steps: int = 0,
    top_n: int = 25,
    data_file: str | None = None,
) -> dict:
    """Profile the steps and write trace(s), profile.md and profile.json to ``out``."""
    from bundleflow.maths.flow import VelocityField
    from bundleflow.train.data import load_run_data
    from bundleflow.train.run import make_accelerator

    accelerator = make_accelerator(cfg, device)
    data = load_run_data(cfg.data, device, data_file=data_file)
    stages = []
    if stage1_steps:
        # the timed phase lasts MIN_SAMPLED_S on a GPU: room for ~10^6 steps in the history
        calls = warmup + 2 * stage1_steps + 1_000_000
        step1, flow = stage1_step(cfg, data.n_items, device, accelerator, calls)
        logger.info("profile: Stage 1, {} warm-up + 2×{} steps", warmup, stage1_steps)
        stages.append(
            measure(
                "stage1",
                step1,
                device,
                warmup=warmup,
                steps=stage1_steps,
                top_n=top_n,
                trace_path=out / TRACE_STAGE1,
            )
        )
    else:
        torch.manual_seed(cfg.stage1.seed)
        flow = VelocityField(data.n_items, cfg.flow.hidden, cfg.flow.hidden2)
    step2, plan = stage2_step(cfg, flow, data, device)
    logger.info("profile: Stage 2 as `bundleflow train` runs it: {}", plan.describe())
    logger.info("profile: Stage 2, {} warm-up + 2×{} steps", warmup, steps)
    stages.append(
        measure(
            "stage2", step2, device, warmup=warmup, steps=steps, top_n=top_n, trace_path=out / TRACE
        )
    )
    report = {
        "environment": environment(device),
        "config": config_summary(cfg, data.n_items, plan),
        "warmup": warmup,
        "flow": "Stage-1 steps above" if stage1_steps else "random initialisation",
        "stages": {s.name: s.__dict__ for s in stages},
        "stage2_step_plan": plan.to_dict(),
        "resolved_config": to_dict(cfg),
    }
    (out / REPORT_JSON).write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / REPORT_MD).write_text(format_markdown(report))
    return report


def config_summary(cfg: Config, n_items: int, plan: StepPlan) -> dict:
    """The shape of what was profiled, for the report's header: sizes, path and precision."""
    return {
        "name": cfg.name,
        "n_items": n_items,
        "menu_size": cfg.menu.size,
        "support": cfg.menu.support,
        "batch_size": cfg.stage2.batch_size,
        "euler_steps": cfg.flow.euler_steps,
        "path": cfg.stage2.path,
        "mixed_precision": plan.precision.value,
        "stage1_batch_size": cfg.stage1.batch_size,
    }


def environment(device: torch.device) -> dict:
    env = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }
    if device.type == "cuda":
        from bundleflow.system.telemetry import driver_version

        env["driver"] = driver_version()
    return env


def _ops_table(rows: list[dict], key: str, label: str, device: bool) -> list[str]:
    """A markdown table; the other time column only where there is a device time."""
    other = "self_device_ms" if key == "self_cpu_ms" else "self_cpu_ms"
    other_label = "self device ms" if key == "self_cpu_ms" else "self CPU ms"
    head = f"| operator | kind | calls/step | {label}/step | share |"
    rule = "|---|---|---:|---:|---:|"
    if device:
        head, rule = head + f" {other_label}/step |", rule + "---:|"
    lines = [head, rule]
    for r in rows:
        name = r["name"].replace("|", "\\|")
        if len(name) > 90:
            name = name[:87] + "..."
        row = (
            f"| `{name}` | {r['kind']} | {r['calls_per_step']:g} | {r[key]:.3f} | "
            f"{100 * r['share']:.1f}% |"
        )
        lines.append(row + (f" {r[other]:.3f} |" if device else ""))
    return lines


def format_markdown(report: dict) -> str:
    env, c = report["environment"], report["config"]
    lines = [
        "# bundleflow profile",
        "",
        f"- device: {env['device_name']} ({env['device']}); torch {env['torch']}, CUDA "
        f"{env['cuda'] or 'none'}"
        + (f", driver {env['driver']}" if env.get("driver") else "")
        + f"; {env['threads']} CPU threads; {env['machine']}; {env['date']}",
        f"- config {c['name']}: m={c['n_items']}, J={c['menu_size']}, D={c['support']}, "
        f"B={c['batch_size']}, Euler steps {c['euler_steps']}, path {c['path']}, mixed "
        f"precision {c['mixed_precision']}; flow: {report['flow']}",
        f"- {report['warmup']} warm-up steps, then N timed steps (on a GPU: as many as fill "
        f"{MIN_SAMPLED_S:g} s, for NVML's utilisation), then N steps under torch.profiler "
        "(its overhead shows in the profiled times; the tables are per profiled step)",
    ]
    for s in report["stages"].values():
        t, pt = s["timing"], s["profiled_timing"]
        lines += [
            "",
            f"## {s['name']}",
            "",
            f"- step time ({t['steps']} steps): median {t['median_ms']:.2f} ms, p90 "
            f"{t['p90_ms']:.2f} ms (min {t['min_ms']:.2f}, max {t['max_ms']:.2f}); under the "
            f"profiler median {pt['median_ms']:.2f} ms",
            "- peak memory: " + ", ".join(f"{k} {v}" for k, v in s["peak_memory"].items()),
        ]
        util = s["gpu_utilization"]
        if util:
            lines.append(
                f"- GPU utilisation (NVML, {util['samples']} samples every "
                f"{util['interval_s']} s): mean {util['mean_percent']}%, median "
                f"{util['median_percent']}%, max {util['max_percent']}%; memory used max "
                f"{util['memory_used_max_gib']} GiB"
            )
        else:
            lines.append("- GPU utilisation: none (not on a GPU)")
        lines += [f"- note: {n}" for n in s["notes"]]
        lines += [
            f"- trace: `{s['trace']}`",
            "",
            f"### Top operators by self CPU time (total {s['total_self_cpu_ms']:.2f} ms/step)",
            "",
            *_ops_table(s["top_cpu"], "self_cpu_ms", "self CPU ms", bool(s["top_device"])),
        ]
        if s["top_device"]:
            lines += [
                "",
                "### Top GPU kernels by device time "
                f"(total {s['total_self_device_ms']:.2f} ms/step)",
                "",
                *_ops_table(s["top_device"], "self_device_ms", "device ms", False),
            ]
    return "\n".join(lines) + "\n"
