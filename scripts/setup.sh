#!/usr/bin/env bash
# Create .venv and install bundleflow with its dev tools and the tracking (tensorboard) and
# notebook (nbclient, ipykernel) extras.
# torch is installed first and pinned here (not in pyproject, which keeps a range), from the
# index that fits this machine (bundleflow/system/torch_index.py, the README's driver table): no
# NVIDIA driver -> the CPU build; a driver -> the newest CUDA build it runs. It prints what it
# chose and why; when that index is unreachable it says so and installs from pip's own index.
# Override for your machine:
#   TORCH_SPEC="torch==2.13.0+cu126" bash scripts/setup.sh          (that build, from its index)
#   TORCH_SPEC="torch==2.5.1" TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124 bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
ASKED_TORCH=${TORCH_SPEC:-}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
# An existing torch is kept, unless TORCH_SPEC was given (then pip installs that build if the
# installed one does not match it, e.g. a CPU wheel replaced by a CUDA one).
if [ -n "$ASKED_TORCH" ] || ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    echo "setup: $TORCH_SPEC from TORCH_INDEX_URL=$TORCH_INDEX_URL (given)"
    .venv/bin/python -m pip install --quiet "$TORCH_SPEC" --index-url "$TORCH_INDEX_URL"
  else
    # stdout: the pip arguments, one a line; stderr: what was chosen and why
    mapfile -t TORCH_ARGS < <(.venv/bin/python bundleflow/system/torch_index.py --spec "$TORCH_SPEC")
    [ "${#TORCH_ARGS[@]}" -gt 0 ] || { echo "setup: could not choose a torch build" >&2; exit 1; }
    .venv/bin/python -m pip install --quiet "${TORCH_ARGS[@]}"
  fi
fi
# dev: the test tools; tracking: tensorboard, which tests/test_tracking.py reads back;
# notebook: the kernel tests/test_notebook.py runs the quickstart notebook in
.venv/bin/python -m pip install --quiet -e ".[dev,tracking,notebook]"
.venv/bin/python -c "import torch, bundleflow; print(f'bundleflow {bundleflow.__version__}, torch {torch.__version__}')"
