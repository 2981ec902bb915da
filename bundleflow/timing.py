"""Wall-time accounting of a run by section (data, Stage 1, Stage 2, validation, ...)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator


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
