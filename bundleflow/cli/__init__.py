"""The command line: one module per command group. Each parses arguments, calls one function
of a lower layer and prints the result (stdout) or the log (stderr); no training logic lives
here. May import every layer below it; nothing imports it. ``bundleflow.cli.app.main`` is the
entry point."""

from bundleflow.cli.app import main

__all__ = ["main"]
