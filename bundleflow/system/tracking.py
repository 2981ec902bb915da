"""Experiment tracking: a run's numbers in TensorBoard or Weights & Biases as well.

``metrics.jsonl`` stays the record. :class:`bundleflow.train.run.Run` hands every line it
writes there to the run's :class:`Tracker` too, so a tracker shows the same scalars under
the same names, namespaced by stage (``stage1/loss``, ``stage2/soft_revenue``,
``stage2/val_revenue``, ``stage2/inv_temp``, ``stage2/step_time``,
``stage2/gpu_utilization``, ...) against that stage's step. The run's resolved config goes in
as hyperparameters, the final report (summary text, comparison table, headline numbers
under ``report/``) at the end.

``--report-to tensorboard`` writes event files to ``RUN_DIR/tensorboard`` (offline; needs
the ``tensorboard`` package, the ``tracking`` extra); ``--report-to wandb`` logs to a W&B
run named and keyed by the run directory (``wandb`` is imported only then; its own
variables, e.g. ``WANDB_PROJECT`` and ``WANDB_MODE=offline``, apply). A resumed run continues
in the same directory / W&B run.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bundleflow.errors import BundleflowError

REPORT_TO = ("none", "tensorboard", "wandb")
TENSORBOARD_DIR = "tensorboard"
WANDB_PROJECT = "bundleflow"  # unless WANDB_PROJECT says otherwise
# The hyperparameter view's metrics: the numbers runs are compared by.
HPARAM_METRICS = (
    "stage2/best_val_revenue",
    "report/test_revenue",
    "report/fraction_of_max_value",
    "report/ratio_to_best_baseline",
)
_INSTALL = {
    "tensorboard": "pip install 'bundleflow[tracking]' (or pip install tensorboard)",
    "wandb": "pip install wandb",
}


def check_available(report_to: str) -> None:
    """Raise one clear error when the package ``--report-to`` needs is not importable: before
    a run directory exists or anything is trained."""
    if report_to == "none":
        return
    try:
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401 - needs tensorboard
        else:
            import wandb  # noqa: F401
    except ImportError as err:
        raise BundleflowError(
            f"--report-to {report_to}: the {report_to} package is not installed ({err}); "
            f"{_INSTALL[report_to]}, or train with --report-to none"
        ) from None


def record_scalars(record: Mapping[str, Any]) -> tuple[dict[str, float], int | None]:
    """A ``metrics.jsonl`` line as (tag -> number, step): its numbers, named
    ``stage{N}/{key}`` when the line has a stage; ``stage`` and ``step`` are the axis."""
    stage, step = record.get("stage"), record.get("step")
    prefix = f"stage{stage}/" if stage is not None else ""
    scalars = {
        prefix + key: float(value)
        for key, value in record.items()
        if key not in ("stage", "step")
        and isinstance(value, int | float)
        and not isinstance(value, bool)
    }
    return scalars, step if isinstance(step, int) else None


def flat_hparams(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """The nested config as dotted keys; lists as text, None left out (no value to compare)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_hparams(value, name + "."))
        elif isinstance(value, bool | int | float | str):
            out[name] = value
        elif value is not None:
            out[name] = str(value)
    return out


class Tracker:
    """What the run sends to a tracker. This base sends nothing (``--report-to none``)."""

    where = ""  # how to look at it, for the log

    def log(self, scalars: Mapping[str, float], step: int | None) -> None:
        """Numbers named by tag at one step."""

    def log_record(self, record: Mapping[str, Any]) -> None:
        """One ``metrics.jsonl`` line (:func:`record_scalars`)."""
        scalars, step = record_scalars(record)
        if scalars:
            self.log(scalars, step)

    def log_hparams(self, config: Mapping[str, Any], text: str) -> None:
        """The resolved config: as hyperparameters, and ``text`` (its YAML) as written."""

    def log_report(
        self,
        summary: str,
        table: tuple[Sequence[str], Sequence[Sequence[str]]],
        scalars: Mapping[str, float],
        step: int | None,
    ) -> None:
        """The final report: its summary text, the comparison table (head, rows) and the
        headline numbers (``report/...``)."""

    def close(self) -> None:
        """Flush and let go of files and connections."""


class TensorBoardTracker(Tracker):
    """Event files in ``RUN_DIR/tensorboard`` (torch's SummaryWriter; appended on resume)."""

    def __init__(self, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR))
        self.where = f"tensorboard --logdir {run_dir / TENSORBOARD_DIR}"

    def log(self, scalars: Mapping[str, float], step: int | None) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, global_step=step)

    def log_hparams(self, config: Mapping[str, Any], text: str) -> None:
        from torch.utils.tensorboard.summary import hparams

        # In this run's own directory (SummaryWriter.add_hparams would open a new one per
        # call), so TensorBoard's HPARAMS tab shows one row per run with its scalars.
        for summary in hparams(flat_hparams(config), dict.fromkeys(HPARAM_METRICS, 0.0)):
            self.writer.file_writer.add_summary(summary)
        self.writer.add_text("config", _code_block(text))
        self.writer.flush()

    def log_report(self, summary, table, scalars, step) -> None:
        self.log(scalars, step)
        head, rows = table
        self.writer.add_text("report", _code_block(summary) + "\n\n" + _markdown(head, rows), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    """One W&B run per run directory (its name is the id, so a resumed run continues it).
    Each stage has its own step axis (``stage1/step``, ``stage2/step``)."""

    def __init__(self, run_dir: Path, config: Mapping[str, Any]) -> None:
        import wandb

        self.wandb = wandb
        try:
            self.run = wandb.init(
                project=os.environ.get("WANDB_PROJECT") or WANDB_PROJECT,
                name=run_dir.name,
                id=wandb_id(run_dir),
                resume="allow",
                dir=str(run_dir),
                config=dict(config),
            )
        except Exception as err:  # noqa: BLE001 - not logged in, no network, a bad setting
            reason = (str(err).splitlines() or [type(err).__name__])[0]
            raise BundleflowError(
                f"--report-to wandb: W&B did not start a run ({reason}); run `wandb login`, "
                "or set WANDB_MODE=offline to log locally"
            ) from None
        url = getattr(self.run, "url", None)  # None offline
        self.where = f"W&B run {self.run.id}" + (f" {url}" if url else "")
        for stage in ("stage1", "stage2"):
            self.run.define_metric(f"{stage}/step")
            self.run.define_metric(f"{stage}/*", step_metric=f"{stage}/step")
        self.run.define_metric("report/*", step_metric="stage2/step")

    def log(self, scalars: Mapping[str, float], step: int | None) -> None:
        payload = dict(scalars)
        if step is not None:  # each stage's numbers against its own step
            for axis in {tag.split("/", 1)[0] for tag in scalars} & {"stage1", "stage2"}:
                payload[f"{axis}/step"] = step
        self.run.log(payload)

    def log_hparams(self, config: Mapping[str, Any], text: str) -> None:
        self.run.config.update(dict(config), allow_val_change=True)

    def log_report(self, summary, table, scalars, step) -> None:
        head, rows = table
        payload: dict[str, Any] = dict(scalars)
        if step is not None:
            payload["stage2/step"] = step  # report/* is plotted against Stage 2's steps
        payload["report/table"] = self.wandb.Table(columns=list(head), data=[list(r) for r in rows])
        self.run.log(payload)
        self.run.summary.update({**scalars, "report/summary": summary})

    def close(self) -> None:
        self.run.finish()


def wandb_id(run_dir: Path) -> str:
    """The W&B run id of a run directory: its name, in the characters W&B allows."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", run_dir.name)[-64:]


def open_tracker(report_to: str, run_dir: Path, config: Mapping[str, Any]) -> Tracker:
    """The tracker ``--report-to`` names for ``run_dir`` (:func:`check_available` first)."""
    check_available(report_to)
    if report_to == "tensorboard":
        return TensorBoardTracker(run_dir)
    if report_to == "wandb":
        return WandbTracker(run_dir, config)
    return Tracker()


def report_scalars(report: Mapping[str, Any]) -> dict[str, float]:
    """The headline numbers of an evaluation report (``report/...``), those present."""
    out: dict[str, float] = {}
    revenue = report.get("revenue") or {}
    if "mean" in revenue:
        out["report/test_revenue"] = revenue["mean"]
    if "fraction_of_max_value" in report:
        out["report/fraction_of_max_value"] = report["fraction_of_max_value"]
    ratio = report.get("ratio_to_best_baseline") or {}
    if "ratio" in ratio:
        out["report/ratio_to_best_baseline"] = ratio["ratio"]
    for name, entry in (report.get("baselines") or {}).items():
        mean = (entry.get("revenue") or {}).get("mean")
        if mean is not None:
            out[f"report/baseline/{name}"] = mean
    return {k: float(v) for k, v in out.items() if v is not None and math.isfinite(float(v))}


def _code_block(text: str) -> str:
    """Text shown as written (TensorBoard renders text as markdown)."""
    return "\n".join("    " + line for line in text.splitlines())


def _markdown(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
