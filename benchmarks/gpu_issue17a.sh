#!/usr/bin/env bash
# Issue 17, H200 call 1 (2026-12-01): paper-m50 (CATS arbitrary-upv m=50, data seed 0) with the
# wide Stage-1 source + best fallback + posted-price init ("W"), and W + the straight-through
# gradient to the bundles ("WST"), 3 training seeds each; then the GPU test tier.
set -u
source benchmarks/gpu_env.sh
export BUNDLEFLOW_CACHE=/tmp/cache
W_SET="--set flow.log_std=-1 --set menu.fallback=best --set menu.posted_price_init=true"
run() {  # run VARIANT SEED extra-args...: one paper-m50 run in its own runs root
  local v=$1 s=$2; shift 2
  BUNDLEFLOW_HOME=/tmp/w/$v-$s timeout 400 python3 -m bundleflow train --preset paper-m50 \
    --no-progress --set stage1.seed=$s --set stage2.seed=$s "$@" > "$W/$v-$s.log" 2>&1
}
run W 0 $W_SET; keep
run W 1 $W_SET & run W 2 $W_SET & run WST 0 $W_SET --set menu.bundle_grad=straight_through & wait; keep
run WST 1 $W_SET --set menu.bundle_grad=straight_through &
run WST 2 $W_SET --set menu.bundle_grad=straight_through & wait; keep
timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests/ > "$W/gpu_tests.log" 2>&1
echo "rc=$?" >> "$W/gpu_tests.log"; keep
for f in $W/W*.log; do echo "$f: $(grep -h 'menu / best' $f) $(grep -h '^time:' $f)"; done
tail -n 3 $W/gpu_tests.log
