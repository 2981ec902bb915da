#!/usr/bin/env bash
# Set up .venv if needed, then lint and run the fast test suite (CPU, no GPU needed).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m slow` or `-m gpu` on a GPU host.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest -q "$@"
