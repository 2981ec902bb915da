#!/usr/bin/env bash
# Issues 16/17, H200 call 3 (2026-12-01): the GPU test that failed in call 2 on a config
# parse (`mixed_precision=no` read as YAML false; fixed), then more fresh-data runs of the
# presets' recipe: arbitrary-upv-m100 (data seed 1), regions-upv-m50 (data seed 2),
# arbitrary-upv-m50 (data seed 1, training seed 1). One run at a time.
set -u
source benchmarks/gpu_env.sh
export BUNDLEFLOW_CACHE=/tmp/cache
timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider \
  tests/test_trainer.py::test_graph_and_eager_steps_agree_over_1000_steps > "$W/gpu_test.log" 2>&1
echo "rc=$?" >> "$W/gpu_test.log"; keep; tail -n 2 "$W/gpu_test.log"
run_preset arb100_d1 arbitrary-upv-m100 --set data.seed=1
run_preset reg_d2 regions-upv-m50 --set data.seed=2
run_preset arb_d1_s1 arbitrary-upv-m50 --set data.seed=1 --set stage1.seed=1 --set stage2.seed=1
