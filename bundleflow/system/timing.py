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


PROFILE_STATS = ("steps", "median", "p90", "mean", "min", "max")
"""The figures of ``bundleflow profile``'s step times (profile.json and profile.md)."""


def nearest_rank(ascending: list[float], share: float) -> float:
    """The ``share`` quantile by nearest rank: the smallest value with at least that share of
    the values at or below it (p90 of 1..10 is 9). One definition for every step-time table."""
    return ascending[max(0, math.ceil(share * len(ascending)) - 1)]


def step_stats(
    seconds: list[float], fields: tuple[str, ...] = PROFILE_STATS, digits: int = 3
) -> dict:
    """Step times in milliseconds: ``steps`` and ``<figure>_ms`` for each other of ``fields``
    (median, p10 and p90 by nearest rank, mean, min, max), in that order, rounded to
    ``digits``."""
    ms = sorted(s * 1e3 for s in seconds)
    figures = {
        "median": statistics.median(ms),
        "p10": nearest_rank(ms, 0.1),
        "p90": nearest_rank(ms, 0.9),
        "mean": statistics.fmean(ms),
        "min": ms[0],
        "max": ms[-1],
    }
    return {
        name if name == "steps" else f"{name}_ms": (
            len(ms) if name == "steps" else round(figures[name], digits)
        )
        for name in fields
    }
