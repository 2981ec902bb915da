#!/usr/bin/env bash
# Known-optimum suite on a lent GPU: one training run per line of a plan, one result line
# each (hard test revenue, ratio to the optimum with its CI, ratio to the best posted price,
# learned elements in use, time). The plan is a file of lines "NAME PRESET [--set ...]".
#   bash benchmarks/known_optimum_runs.sh PLAN [LIMIT_SECONDS]
# Results (logs without data or weights) come back in $OUT/results.tgz.
set -u
source benchmarks/gpu_env.sh
export BUNDLEFLOW_CACHE=/tmp/cache
start=$SECONDS
while read -r name preset args; do
  [ -z "$name" ] || [ "${name:0:1}" = "#" ] && continue
  [ $((SECONDS - start)) -gt ${2:-540} ] && { echo "$name: skipped (time)"; continue; }
  t0=$SECONDS
  # shellcheck disable=SC2086
  BUNDLEFLOW_HOME=$W/$name timeout ${RUN_TIMEOUT:-150} python3 -m bundleflow train \
    --preset "$preset" --no-progress $args > "$W/$name.out" 2> "$W/$name.log"
  rc=$?
  rev=$(grep -h '^test revenue' "$W/$name.out" | sed 's/test revenue (hard, //')
  opt=$(grep -h '^ratio to optimum' "$W/$name.out" | tr -s ' ')
  best=$(grep -ho 'menu / best = .*' "$W/$name.out")
  use=$(grep -ho 'elements in use: [0-9]* of [0-9]*' "$W/$name.out")
  echo "$name rc=$rc | $rev | $opt | $best | $use | $((SECONDS - t0)) s"
  keep
done < "$1"
