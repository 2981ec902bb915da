"""The command line: the only module that reads argv and turns user errors into exit codes.

Exit codes (the contract in the CLI spec): 0 success, 1 a check failed, 2 a user error
(one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import sys
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
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # Each command module registers its own sub-parser and sets `func` (args -> exit code).
    from bundleflow import cli_data

    cli_data.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return EXIT_USER_ERROR
    try:
        return int(args.func(args) or EXIT_OK)
    except BundleflowError as err:
        sys.stderr.write(f"bundleflow: error: {err}\n")
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        sys.stderr.write("bundleflow: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
