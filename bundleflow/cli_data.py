"""`bundleflow data ...` commands (generate, stats, convert)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `data` command group to the top-level parser."""
    data = sub.add_parser("data", help="generate, inspect and convert valuation data sets")
    data.set_defaults(func=lambda args: data.print_help() or 2)
