#!/usr/bin/env bash
# Time the Stage-2 step, fast path against reference path (`bundleflow bench`).
# Arguments go to the command, e.g. `bash scripts/bench.sh --device cuda --json` or
# `bash scripts/bench.sh --items 500 --target-ms 2`. Uses .venv when it exists.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
exec "$PY" -m bundleflow bench "$@"
