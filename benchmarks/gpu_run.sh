#!/usr/bin/env bash
# A plan of commands on a lent GPU machine, one after another, one result line each; what they
# measure is in the plan (benchmarks/plans/*.txt: step_speed, whole_run, scaling, memory,
# gpu_tier). Repository root as the working directory.
#   bash benchmarks/gpu_run.sh PLAN [LIMIT_SECONDS]
# A plan is a file of lines "NAME COMMAND [ARGS...]" ('#' comments and blank lines skipped).
# COMMAND runs under bash with BUNDLEFLOW_HOME=/tmp/w/NAME (its runs and files) and a shared
# BUNDLEFLOW_CACHE (a later line finds the data, flow and baselines an earlier one made),
# stdout to /tmp/w/NAME.out, stderr to /tmp/w/NAME.log, cut at RUN_TIMEOUT seconds (default
# 300); a line that would start after LIMIT_SECONDS (default 540) is skipped. The result line:
# the exit code, a training run's revenue and time breakdown (else the command's last line of
# output) and the wall time. Results without data or weights come back in $OUT/results.tgz.
set -u
source benchmarks/gpu_env.sh
export BUNDLEFLOW_CACHE=/tmp/cache
start=$SECONDS
while read -r name cmd; do
  [ -z "$name" ] || [ "${name:0:1}" = "#" ] && continue
  [ $((SECONDS - start)) -gt ${2:-540} ] && { echo "$name: skipped (time)"; continue; }
  t0=$SECONDS
  mkdir -p "$W/$name"
  BUNDLEFLOW_HOME=$W/$name timeout ${RUN_TIMEOUT:-300} bash -c "$cmd" \
    > "$W/$name.out" 2> "$W/$name.log" < /dev/null
  rc=$?
  if grep -q '^time:' "$W/$name.out" "$W/$name.log"; then
    got="$(grep -h 'menu / best' "$W/$name.out" "$W/$name.log") $(grep -h '^time:' "$W/$name.out" "$W/$name.log")"
  else
    got=$(tail -n 1 "$W/$name.out" | cut -c 1-300)
  fi
  echo "$name rc=$rc | $got | $((SECONDS - t0)) s"
  keep
done < "${1:?plan}"
