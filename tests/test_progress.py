"""One output discipline: a tqdm bar that log lines never break on a terminal, plain periodic
progress lines through loguru elsewhere, nothing with --no-progress (bundleflow.system.progress and
the CLI's log sink, bundleflow.cli.app.setup_logging)."""

from __future__ import annotations

import io
import re
import sys

import pytest
from loguru import logger

from bundleflow.cli.app import setup_logging
from bundleflow.system import progress
from bundleflow.system.progress import ProgressBar

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d INFO +stage 2 step 250: validation revenue 1\.5$")


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def render(text: str) -> list[str]:
    """What a terminal shows for ``text``: ``\\r`` returns to column 0 and overwrites."""
    lines, line, col = [], [], 0
    for ch in ANSI.sub("", text):
        if ch == "\n":
            lines.append("".join(line).rstrip())
            line, col = [], 0
        elif ch == "\r":
            col = 0
        else:
            if col < len(line):
                line[col] = ch
            else:
                line.append(ch)
            col += 1
    if line:
        lines.append("".join(line).rstrip())
    return lines


@pytest.fixture
def log_lines():
    """Loguru INFO messages of bundleflow while the test runs (the library is quiet otherwise)."""
    messages: list[str] = []
    logger.enable("bundleflow")
    sink = logger.add(lambda m: messages.append(m.record["message"]), level="INFO")
    yield messages
    logger.remove(sink)
    logger.disable("bundleflow")


@pytest.fixture
def cli_logging(monkeypatch):
    """A function that makes stderr a fake terminal with the CLI's log sink on it (inside the
    test: pytest re-installs its own stderr between setup and call); loguru is restored after."""

    def start() -> FakeTerminal:
        terminal = FakeTerminal()
        monkeypatch.setattr(sys, "stderr", terminal)
        setup_logging()
        return terminal

    yield start
    logger.remove()
    logger.add(sys.__stderr__)
    logger.disable("bundleflow")


def test_log_line_lands_on_its_own_line_above_the_bar(cli_logging):
    terminal = cli_logging()
    bar = ProgressBar(500, "stage 2", unit="steps")  # stderr, a terminal: the bar
    for step in range(1, 251):
        bar(step)
    logger.info("stage 2 step 250: validation revenue 1.5")
    for step in range(251, 301):
        bar(step)
    bar.close()
    shown = render(terminal.getvalue())
    assert any(LOG_LINE.match(line) for line in shown), shown
    bar_lines = [line for line in shown if line.startswith("stage 2")]
    assert bar_lines and "300/500" in bar_lines[-1]  # redrawn below the log line, then kept
    assert shown.index(bar_lines[-1]) > next(i for i, s in enumerate(shown) if LOG_LINE.match(s))


def test_bar_closes_its_line_at_the_end(cli_logging):
    terminal = cli_logging()
    bar = ProgressBar(10, "stage 1", unit="steps")
    for step in range(1, 11):
        bar(step)
    text = terminal.getvalue()
    assert text.endswith("\n") and "10/10" in render(text)[-1]


def test_plain_lines_off_a_terminal_are_periodic_and_bounded(log_lines):
    stream = io.StringIO()  # not a terminal: CI, nohup, docker logs
    bar = ProgressBar(30_000, "stage 1", stream=stream, unit="steps")
    reports = sum(bool(bar(step)) for step in range(1, 30_001))
    bar.close()
    assert stream.getvalue() == ""  # no bar characters in a log file
    assert 10 <= len(log_lines) <= 11 and reports == len(log_lines)
    line = re.compile(r"^stage 1: (\d+)/30000 steps \((\d+)%\), \d+\.\d s, eta (\d+ s|\?)$")
    assert all(line.match(m) for m in log_lines), log_lines
    assert log_lines[-1].startswith("stage 1: 30000/30000 steps (100%)")
    assert "stage 1: 3000/30000 steps (10%)" in log_lines[-10]


def test_early_line_when_the_first_mark_is_slow(monkeypatch, log_lines):
    clock = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    bar = ProgressBar(1000, "stage 1", stream=io.StringIO(), unit="steps")
    clock[0] = 1.0
    assert not bar(1)
    clock[0] = 31.0
    assert bar(2)  # 30 s without a line: one early line, with the rate so far
    assert log_lines == ["stage 1: 2/1000 steps (0%), 31.0 s, eta 29940 s"]
    clock[0] = 100.0
    assert not bar(3)  # only once
    assert bar(100) and len(log_lines) == 2  # then the 10% marks


def test_resumed_loop_reports_from_its_next_mark(log_lines):
    bar = ProgressBar(100, "stage 2", stream=io.StringIO(), unit="steps")
    reports = [step for step in range(51, 101) if bar(step)]
    assert reports == [60, 70, 80, 90, 100]


def test_disabled_prints_nothing_but_keeps_the_cadence(monkeypatch, log_lines):
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    for stream in (terminal, io.StringIO()):
        bar = ProgressBar(1000, "stage 1", stream=stream, enabled=False)
        reports = [step for step in range(1, 1001) if bar(step)]
        bar.close()
        assert reports == list(range(100, 1001, 100))  # the telemetry cadence stays
    assert terminal.getvalue() == "" and log_lines == []
