"""Progress of a long loop: a tqdm bar on a terminal, plain log lines elsewhere.

On a terminal (stderr is a tty) the bar is tqdm's; the CLI's log sink writes through
``tqdm.write`` (bundleflow.cli.app.setup_logging), so a log line lands on its own line above
the bar instead of gluing onto it.

Elsewhere (CI, nohup, ``docker logs``) a bar is noise, so the same progress goes out as
plain loguru INFO lines, which also reach the run's train.log::

    stage 1: 3000/30000 steps (10%), 12.3 s, eta 110 s

The cadence of those lines: one each time a 10% mark is crossed (:data:`REPORT_MARKS`),
plus one early line once :data:`EARLY_REPORT_S` pass without any, so a slow start still
shows its rate and eta: at most 11 lines per loop however long it runs.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from loguru import logger
from tqdm import tqdm

REPORT_MARKS = 10  # a plain progress line at each 1/REPORT_MARKS of the total (10%, 20%, ...)
EARLY_REPORT_S = 30.0  # ...and one early line when this long passes with none written


class ProgressBar:
    """Progress of ``total`` units of work, reported by calling ``bar(done)``.

    ``enabled=None``: a tqdm bar when ``stream`` (default stderr) is a terminal, plain
    periodic log lines otherwise; ``True`` forces the bar onto ``stream``; ``False`` shows
    nothing. ``bar(done)`` returns True at the plain-line cadence whatever is shown, so a
    caller can hang occasional output (GPU telemetry) on it.
    """

    def __init__(
        self,
        total: int,
        label: str,
        stream: TextIO | None = None,
        enabled: bool | None = None,
        unit: str | None = None,
    ) -> None:
        self.total = max(1, total)
        self.label = label
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        if enabled is None:
            isatty = getattr(self.stream, "isatty", None)
            self.mode = "bar" if isatty is not None and isatty() else "lines"
        else:
            self.mode = "bar" if enabled else "off"
        self.start = time.monotonic()
        self._bar: tqdm | None = None
        self._first: tuple[int, float] | None = None  # (done, time) at the first call
        self._marks = 0  # 10% marks already reported
        self._reported = False  # any report yet (the early line comes only once, first)

    def __call__(self, done: int) -> bool:
        """Record that ``done`` units are finished; True at the plain-line cadence."""
        now = time.monotonic()
        if self._first is None:  # a resumed loop starts part-way: marks and rate from here on
            self._first = (done, now)
            self._marks = self._marks_at(done - 1)
        marks = self._marks_at(done)
        report = marks > self._marks or (not self._reported and now - self.start >= EARLY_REPORT_S)
        if report:
            self._marks = max(self._marks, marks)
            self._reported = True
        if self.mode == "bar":
            self._draw(done)
        elif self.mode == "lines" and report:
            logger.info(self._line(done, now))
        return report

    def _marks_at(self, done: int) -> int:
        """How many of the REPORT_MARKS marks ``done`` has reached (0..REPORT_MARKS)."""
        return max(0, min(done, self.total)) * REPORT_MARKS // self.total

    def _draw(self, done: int) -> None:
        if self._bar is None:
            self._bar = tqdm(
                total=self.total,
                initial=min(done, self.total),
                desc=self.label,
                unit=f" {self.unit}" if self.unit else "it",
                file=self.stream,
                disable=False,
                dynamic_ncols=True,
                leave=True,
            )
        else:
            self._bar.update(min(done, self.total) - self._bar.n)
        if done >= self.total:
            self.close()

    def _line(self, done: int, now: float) -> str:
        elapsed = now - self.start
        first_done, first_time = self._first
        eta = "?"
        if done > first_done and now > first_time:
            rate = (done - first_done) / (now - first_time)
            eta = f"{max(0, self.total - done) / rate:.0f} s"
        unit = f" {self.unit}" if self.unit else ""
        percent = 100 * min(done, self.total) / self.total
        return (
            f"{self.label}: {done}/{self.total}{unit} ({percent:.0f}%), {elapsed:.1f} s, eta {eta}"
        )

    def close(self) -> None:
        """End the bar's line, also when the loop stopped early (a time limit, patience)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
