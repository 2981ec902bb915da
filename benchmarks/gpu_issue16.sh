#!/usr/bin/env bash
# Issue 16 on a lent H200: GPU tier, Stage 1 before (plain loop) and after (captured step),
# paper-m50 wall time with its breakdown, bench at m=50/500, profile of the trained step.
# Repository root as working directory; results in $OUT/results.tgz (the tool returns 8 files).
set -u
source benchmarks/gpu_env.sh
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$W/gpu.txt"
python3 -c "import torch; print(torch.__version__, torch.version.cuda)" >> "$W/gpu.txt"
# before: the plain Stage-1 loop, 3 seeds at once (launch-bound; GPU tests meanwhile)
for s in 0 1 2; do
  OMP_NUM_THREADS=2 timeout 300 python3 scripts/bench_stage1.py --quality --seeds $s \
    --modes plain > "$W/stage1_plain_$s.jsonl" 2>&1 &
done
timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests/ > "$W/gpu_tests.log" 2>&1
echo "rc=$?" >> "$W/gpu_tests.log"
wait; save
# after: the captured step alone on the GPU
timeout 60 python3 scripts/bench_stage1.py > "$W/stage1_timing.jsonl" 2>&1
timeout 120 python3 scripts/bench_stage1.py --quality --seeds 0 1 2 --modes graph \
  > "$W/stage1_graph.jsonl" 2>&1; save
# paper-m50: cold (data generated, kernels compiled), then warm kernels + data, new flow
BUNDLEFLOW_CACHE=/tmp/c1 timeout 200 python3 -m bundleflow train --preset paper-m50 \
  --no-progress > "$W/paper_cold.log" 2>&1
cp -r /tmp/c1/data /tmp/c2/ 2>/dev/null || (mkdir -p /tmp/c2 && cp -r /tmp/c1/data /tmp/c2/)
BUNDLEFLOW_CACHE=/tmp/c2 timeout 200 python3 -m bundleflow train --preset paper-m50 \
  --no-progress > "$W/paper_warm.log" 2>&1; save
for m in 50 500; do
  timeout 100 python3 -m bundleflow bench --items $m --steps 100 --json \
    > "$W/bench_m$m.json" 2> "$W/bench_m$m.err"
done
BUNDLEFLOW_CACHE=/tmp/c2 timeout 100 python3 -m bundleflow profile --preset paper-m50 \
  --steps 20 --out /tmp/prof > "$W/profile.log" 2>&1
cp /tmp/prof/profile.md "$W/profile.md" 2>/dev/null; save
tail -n 3 $W/*.log $W/*.jsonl
