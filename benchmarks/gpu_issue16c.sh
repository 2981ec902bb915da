#!/usr/bin/env bash
# Issues 16/17, H200 call of 2026-12-02 (after gpu_issue16b.sh): paper-m50 twice with compiled
# Adam (cold: data, flow, baselines, kernels; warm: the same command again), then the price
# polish (bundleflow/maths/polish.py, scripts/polish_experiment.py) on an arbitrary-upv-m50 run of
# a fresh data seed. One run at a time.
set -u
source benchmarks/gpu_env.sh
export BUNDLEFLOW_CACHE=/tmp/cache
for run in cold warm; do
  BUNDLEFLOW_HOME=/tmp/w/p50 timeout 150 python3 -m bundleflow train --preset paper-m50 \
    --no-progress > "$W/p50_$run.log" 2>&1; keep
  echo "$run: $(grep -h 'menu / best' $W/p50_$run.log) | $(grep -h '^time:' $W/p50_$run.log)"
done
run_preset arb50_d3 arbitrary-upv-m50 --set data.seed=3
r=$(ls -d /tmp/w/arb50_d3/runs/*/ | head -1)
timeout 200 python3 scripts/polish_experiment.py "$r" --device cuda --rounds 3 \
  --min-buyers 1 20 --json "$W/polish_arb50_d3.json" > "$W/polish_arb50_d3.log" 2>&1; keep
grep -v INFO "$W/polish_arb50_d3.log" | tail -8
