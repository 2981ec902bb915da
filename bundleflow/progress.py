"""A dependency-free progress bar for terminals (stderr)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressBar:
    """A one-line progress bar on a terminal (stderr); silent when it is not a terminal."""

    def __init__(
        self, total: int, label: str, stream: TextIO | None = None, enabled: bool | None = None
    ) -> None:
        self.total = max(1, total)
        self.label = label
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.start = time.monotonic()
        self._last_draw = 0.0
        self._open = False  # a partial line is on the stream

    def __call__(self, done: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if done < self.total and now - self._last_draw < 0.1:
            return
        self._last_draw = now
        frac = min(1.0, done / self.total)
        elapsed = now - self.start
        eta = elapsed / frac - elapsed if frac > 0 else 0.0
        bar = "#" * int(30 * frac)
        self.stream.write(
            f"\r{self.label} [{bar:<30}] {done}/{self.total} {elapsed:5.1f}s eta {eta:5.1f}s"
        )
        if done >= self.total:
            self.stream.write("\n")
            self._open = False
        else:
            self._open = True
        self.stream.flush()

    def close(self) -> None:
        """End the line if the bar stopped early (a time limit, patience)."""
        if self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = False
