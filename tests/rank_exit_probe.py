"""A torchrun rank of ``bundleflow`` that records, at interpreter exit, the native threads
still running (``$BUNDLEFLOW_EXIT_PROBE/rank<R>.txt``), and can raise in one rank
(``BUNDLEFLOW_FAULT_RANK``, at Stage-2 step ``BUNDLEFLOW_FAULT_STEP``): the shutdown paths
of issue 28 under test. Registered first, the record is the last exit hook to run."""

from __future__ import annotations

import atexit
import os
import sys
from pathlib import Path


def _record() -> None:
    tasks = Path("/proc/self/task")
    names = sorted((t / "comm").read_text().strip() for t in tasks.iterdir())
    out = Path(os.environ["BUNDLEFLOW_EXIT_PROBE"]) / f"rank{os.environ.get('RANK', '0')}.txt"
    out.write_text("\n".join(names) + "\n")


def _fault(step_at: int) -> None:
    from bundleflow.train.stage2 import Stage2Trainer

    step = Stage2Trainer.step

    def failing(self):
        if self.state.step + 1 >= step_at:
            raise RuntimeError(f"injected fault at step {step_at}")
        return step(self)

    Stage2Trainer.step = failing


if __name__ == "__main__":
    atexit.register(_record)
    if os.environ.get("BUNDLEFLOW_FAULT_RANK") == os.environ.get("RANK"):
        _fault(int(os.environ.get("BUNDLEFLOW_FAULT_STEP", "5")))
    from bundleflow.cli.app import main

    sys.exit(main())
