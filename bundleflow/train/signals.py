"""Stopping a training loop cleanly on SIGTERM / SIGINT (Ctrl-C, `docker stop`, pre-emption)."""

from __future__ import annotations

import signal
import threading

from loguru import logger


class StopRequest:
    """SIGTERM/SIGINT during a loop set a flag instead of killing the process: the loop
    finishes its step, writes a checkpoint and the run exits 0. A second signal interrupts
    at once (KeyboardInterrupt)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def _handler(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning(
            "{} received: finishing the step and writing a checkpoint (again to abort)",
            signal.Signals(signum).name,
        )

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
