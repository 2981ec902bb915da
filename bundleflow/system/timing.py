"""Timing helpers: a run's wall time by section, device synchronisation, step statistics."""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Iterator

import torch


class Timings:
    """Seconds per named section, in the order the sections first ran."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        start = time.monotonic()
        try:
            yield
        finally:
            self.add(name, time.monotonic() - start)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def total(self) -> float:
        return time.monotonic() - self.started

    def as_dict(self) -> dict[str, float]:
        """Every section, ``other`` (what no section covered) and ``total``, in seconds."""
        total = self.total()
        out = {name: round(value, 3) for name, value in self.seconds.items()}
        out["other"] = round(max(0.0, total - sum(self.seconds.values())), 3)
        out["total"] = round(total, 3)
        return out

    def format(self) -> str:
        """``time: data 1.2 s, stage 1 8.0 s, ..., total 31.0 s``."""
        parts = [f"{name} {value:.1f} s" for name, value in self.as_dict().items()]
        return "time: " + ", ".join(parts)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def step_stats(seconds: list[float]) -> dict:
    """Median, p90 (nearest rank), mean, min and max of step times, in milliseconds."""
    ms = sorted(s * 1e3 for s in seconds)
    p90 = ms[max(0, math.ceil(0.9 * len(ms)) - 1)]
    return {
        "steps": len(ms),
        "median_ms": round(statistics.median(ms), 3),
        "p90_ms": round(p90, 3),
        "mean_ms": round(statistics.fmean(ms), 3),
        "min_ms": round(ms[0], 3),
        "max_ms": round(ms[-1], 3),
    }
