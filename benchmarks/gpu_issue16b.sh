#!/usr/bin/env bash
# Issue 16, H200 call of 2026-12-02: compiled Adam (bundleflow/maths/adam.py) — the GPU tier, Adam
# side by side, bench m=50/500, profile of the trained step, paper-m50 twice (cold, warm)
# with a cProfile of the warm run (where Stage 2's time outside the steps goes).
set -u
source benchmarks/gpu_env.sh
export BUNDLEFLOW_CACHE=/tmp/cache
part=${1:-all}  # tier | runs | all (one device call each: tier ≈ 8 min, runs ≈ 6 min)
if [ "$part" != runs ]; then
timeout 400 python3 -m pytest -q -m gpu -p no:cacheprovider -x > "$W/gpu_tier.log" 2>&1
echo "rc=$?" >> "$W/gpu_tier.log"; keep; tail -n 3 "$W/gpu_tier.log"
timeout 120 python3 scripts/bench_adam.py > "$W/bench_adam.json" 2> "$W/bench_adam.err"; keep
cat "$W/bench_adam.json"; tail -n 3 "$W/bench_adam.err"
for m in 50 500; do
  timeout 150 python3 -m bundleflow bench --items $m --steps 100 --json > "$W/bench_m$m.json" \
    2> "$W/bench_m$m.err"; keep; python3 - "$W/bench_m$m.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
print(sys.argv[1], d["fast"]["median_ms"], d["reference"]["median_ms"], d["ratio"], d["parity_ok"], d["fast"].get("precision"))
PY
done
fi
[ "$part" = tier ] && exit 0
timeout 100 python3 -m bundleflow profile --preset paper-m50 --steps 20 --out /tmp/prof \
  > "$W/profile.log" 2>&1; cp /tmp/prof/profile.md "$W/profile.md" 2>/dev/null; keep
grep -i "adam\|median\|utilis" "$W/profile.md" | head -8
for run in cold warm; do
  prof=""; [ $run = warm ] && prof="-m cProfile -o $W/warm.prof"
  BUNDLEFLOW_HOME=/tmp/w/p50 timeout 150 python3 $prof -m bundleflow train --preset paper-m50 \
    --no-progress > "$W/p50_$run.log" 2>&1; keep
  echo "$run: $(grep -h 'menu / best' $W/p50_$run.log) | $(grep -h '^time:' $W/p50_$run.log)"
done
python3 - "$W/warm.prof" > "$W/warm_prof.txt" <<'PY'
import pstats, sys
p = pstats.Stats(sys.argv[1]); p.sort_stats("cumulative").print_stats(45)
p.sort_stats("tottime").print_stats(25)
PY
keep; grep -E "stage2|fit|save|evaluate|validate|replay|synchron|item|compile" "$W/warm_prof.txt" | head -30
