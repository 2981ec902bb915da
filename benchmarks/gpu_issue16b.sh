#!/usr/bin/env bash
# Issue 16, for the next H200 call (written 2026-12-01, not yet run: no device was lent): paper-m50 wall time and breakdown with the old checkpoint
# cadence (every 1,000 steps) and the new defaults (5,000; baselines cached after the first
# run), each with its own Stage-1 training, warm kernels and cached data; then the GPU tier.
set -u
source benchmarks/gpu_env.sh
P="python3 -m bundleflow train --preset paper-m50 --no-progress"
BUNDLEFLOW_CACHE=/tmp/c0 timeout 200 $P > "$W/paper_0_cold.log" 2>&1; save
for c in A B C; do mkdir -p /tmp/c$c && cp -r /tmp/c0/data /tmp/c$c/; done
cp -r /tmp/c0/baselines /tmp/cB/; cp -r /tmp/c0/baselines /tmp/cC/
BUNDLEFLOW_CACHE=/tmp/cA timeout 200 $P --set stage2.checkpoint_every=1000 \
  --set stage1.checkpoint_every=1000 > "$W/paper_A_ckpt1000.log" 2>&1; save
BUNDLEFLOW_CACHE=/tmp/cB timeout 200 $P > "$W/paper_B_defaults.log" 2>&1; save
BUNDLEFLOW_CACHE=/tmp/cC timeout 200 $P --set stage1.seed=1 > "$W/paper_C_seed1.log" 2>&1; save
timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/ > "$W/gpu_tests.log" 2>&1
echo "rc=$?" >> "$W/gpu_tests.log"; save
grep -h "^time:\|stage 1:\|wall time\|learned menu  " $W/paper_*.log; tail -n 2 $W/gpu_tests.log
