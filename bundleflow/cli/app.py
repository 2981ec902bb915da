"""The command line: the only module that reads argv and turns user errors into exit codes.

Exit codes (the contract in the CLI spec): 0 success, 1 a check failed, 2 a user error
(one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Sequence

from bundleflow import __version__
from bundleflow.errors import BundleflowError

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_USER_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bundleflow",
        description="Train and evaluate BundleFlow menus for combinatorial auctions.",
    )
    parser.add_argument("--version", action="version", version=f"bundleflow {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # Each command module registers its own sub-parser and sets `func` (args -> exit code).
    from bundleflow.cli import bench, compare, config, data, doctor, evaluate, suite, train

    for command in (train, evaluate, data, doctor, bench, config, compare, suite):
        command.register(sub)
    return parser


def setup_logging(verbose: bool = False) -> None:
    """stderr logging for the CLI (the library itself stays silent).

    Lines go out through ``tqdm.write``: it lifts an open progress bar (bundleflow.system.progress),
    writes the line and redraws the bar below it, so a log line never glues onto the bar.
    """
    from loguru import logger
    from tqdm import tqdm

    def to_stderr(message: str) -> None:
        tqdm.write(message, file=sys.stderr, end="")  # sys.stderr now: tests swap it

    colorize = sys.stderr.isatty() and not os.environ.get("NO_COLOR")
    logger.remove()
    logger.enable("bundleflow")
    rank = os.environ.get("RANK", "0")  # set by accelerate launch / torchrun
    if rank == "0":
        logger.add(
            to_stderr,
            level="DEBUG" if verbose else "INFO",
            format="<green>{time:HH:mm:ss}</green> <level>{level: <7}</level> {message}",
            colorize=colorize,
        )
    else:  # under several processes only the main one logs events; the others only problems
        logger.add(
            to_stderr,
            level="WARNING",
            format=f"<green>{{time:HH:mm:ss}}</green> <level>{{level: <7}}</level> [rank {rank}] "
            "{message}",
            colorize=colorize,
        )


def load_env() -> None:
    """`.env` (paths and machine facts) without overriding the shell or compose."""
    from dotenv import find_dotenv, load_dotenv

    load_dotenv(find_dotenv(usecwd=True), override=False)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    load_env()
    setup_logging(args.verbose)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return EXIT_USER_ERROR
    previous = _terminate_as_interrupt()
    try:
        return int(args.func(args) or EXIT_OK)
    except BundleflowError as err:
        sys.stderr.write(f"bundleflow: error: {err}\n")
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        sys.stderr.write("bundleflow: interrupted\n")
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _terminate_as_interrupt():
    """SIGTERM (a pre-empted job, `docker stop`) behaves like Ctrl-C: the Stage-2 loop writes a
    checkpoint and the run can be resumed. Returns the previous handler (None off the main
    thread, where handlers cannot be set)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, handler)


if __name__ == "__main__":
    sys.exit(main())
