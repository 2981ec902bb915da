#!/usr/bin/env bash
# Issues 16/17, H200 call 2 (2026-12-01): the GPU tier; paper-m50 cold then warm (whole-run
# time and breakdown with the checkpoint cadence 5,000 and cached baselines); the presets'
# new recipe on fresh data seeds (arbitrary-upv-m50 and regions-upv-m50, data seed 1,
# training seed 0). Runs one at a time: three paper-size runs at once on one GPU took 6.5x
# longer each in call 1 (gpu_issue17a.sh).
set -u
source benchmarks/gpu_env.sh
export BUNDLEFLOW_CACHE=/tmp/cache
timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/ > "$W/gpu_tests.log" 2>&1
echo "rc=$?" >> "$W/gpu_tests.log"; keep; tail -n 2 "$W/gpu_tests.log"
run_preset paper_cold paper-m50
run_preset paper_warm paper-m50
run_preset arb_d1 arbitrary-upv-m50 --set data.seed=1
run_preset reg_d1 regions-upv-m50 --set data.seed=1
run_preset arb_d2 arbitrary-upv-m50 --set data.seed=2
