#!/usr/bin/env bash
# Revenue of one preset over data seeds × training seeds on a lent GPU: one `bundleflow train`
# per pair (`--set data.seed=D --set stage1.seed=S --set stage2.seed=S`, then ARGS), one at a
# time (paper-size runs side by side on one GPU time-slice it: 6.5× slower each), one line
# each: the mechanism ÷ the best baseline with its CI, and the run's time breakdown.
#   [DATA_SEEDS="0 1 2"] [SEEDS="0 1 2"] [LIMIT=520] [TAG=NAME] \
#     bash benchmarks/revenue_grid.sh PRESET [--set KEY=VALUE ...]
# e.g. the CATS acceptance grid: `bash benchmarks/revenue_grid.sh arbitrary-upv-m50`; additive
# U[0,1] at m=4: `DATA_SEEDS=0 SEEDS=0 TAG=add4 bash benchmarks/revenue_grid.sh additive-m2
# --set data.n_items=4`. Logs (no data or weights) come back in $OUT/results.tgz.
set -u
source benchmarks/gpu_env.sh
export BUNDLEFLOW_CACHE=/tmp/cache
preset=${1:?preset}; shift
tag=${TAG:-$(basename "$preset" .yaml)}
start=$SECONDS
for d in ${DATA_SEEDS:-0 1 2}; do
  for s in ${SEEDS:-0 1 2}; do
    [ $((SECONDS - start)) -gt ${LIMIT:-520} ] && { echo "${tag}_d${d}_s$s: skipped (time)"; continue; }
    run_preset "${tag}_d${d}_s$s" "$preset" --set data.seed="$d" --set stage1.seed="$s" \
      --set stage2.seed="$s" "$@"
  done
done
