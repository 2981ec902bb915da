#!/usr/bin/env bash
# Issue 15 on a lent GPU: the GPU test tier, and the README's single-GPU `accelerate launch`
# with the shipped config (must keep bf16 + compiled kernels), then --resume of that run.
# Repository root as working directory; logs under $OUT.
set -u
[ -d .whl ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
  --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
export BUNDLEFLOW_HOME=/tmp/bf BUNDLEFLOW_CACHE=/tmp/bf/cache PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt"
python3 -c "import torch; print(torch.__version__, torch.version.cuda)" >> "$OUT/gpu.txt"
accelerate launch --config_file configs/accelerate/single_gpu.yaml -m bundleflow train \
  --preset default --max-steps 1500 --no-progress > "$OUT/accelerate_single_gpu.log" 2>&1
echo "rc=$?" >> "$OUT/accelerate_single_gpu.log"
run=$(ls -d /tmp/bf/runs/default-* | head -1)
python3 -m bundleflow train --resume "$run" --no-progress > "$OUT/resume.log" 2>&1
echo "rc=$?" >> "$OUT/resume.log"
python3 -m bundleflow train --resume "$run" --max-steps 3000 > "$OUT/resume_contradiction.log" 2>&1
echo "rc=$?" >> "$OUT/resume_contradiction.log"
timeout 420 python3 -m pytest -q -m gpu -p no:cacheprovider tests/ > "$OUT/gpu_tests.log" 2>&1
echo "rc=$?" >> "$OUT/gpu_tests.log"
