#!/usr/bin/env bash
# Issue 17, H200 call of 2026-12-02 (after the polish's tie-order fix): arbitrary-upv-m50 on
# data seed 3 again, the price polish on its frozen menu, and size lotteries on its data.
set -u
source benchmarks/gpu_env.sh
export BUNDLEFLOW_CACHE=/tmp/cache
run_preset arb50_d3 arbitrary-upv-m50 --set data.seed=3
r=$(ls -d /tmp/w/arb50_d3/runs/*/ | head -1)
timeout 90 python3 scripts/polish_experiment.py "$r" --device cuda --rounds 3 \
  --min-buyers 1 20 > "$W/polish_arb50_d3.log" 2>&1; keep
grep -v INFO "$W/polish_arb50_d3.log" | tail -5
timeout 60 python3 scripts/size_lottery_experiment.py /tmp/cache/data/*m50*seed3*.safetensors \
  > "$W/lottery_arb50_d3.log" 2>&1; keep; grep -v INFO "$W/lottery_arb50_d3.log" | tail -2
