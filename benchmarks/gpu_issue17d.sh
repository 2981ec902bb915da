#!/usr/bin/env bash
# Issue 17, H200 call of 2026-12-02: additive U[0,1], m = 2..10, the presets' recipe
# (fallback = best posted price, elements start at its price, Stage-1 source std e^-1),
# training seeds 0, 1, 2 (seed 0 for every m first), one run at a time, stopping at 520 s.
set -u
source benchmarks/gpu_env.sh
export BUNDLEFLOW_CACHE=/tmp/cache
start=$SECONDS
for seed in 0 1 2; do
  for m in 2 3 4 5 6 7 8 9 10; do
    [ $((SECONDS - start)) -gt 520 ] && break 2
    run_preset add_m${m}_s$seed additive-m2 --set data.n_items=$m --set menu.fallback=best \
      --set menu.posted_price_init=true --set flow.log_std=-1 --set stage1.seed=$seed \
      --set stage2.seed=$seed --set data.seed=$seed
  done
done
