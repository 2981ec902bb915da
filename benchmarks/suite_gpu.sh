#!/usr/bin/env bash
# The known-optimum suite on one lent GPU: `bundleflow suite` for each training seed as its
# own process, side by side (much of a run is CPU work: data, baselines, the polish), on a
# data seed the recipe was not tuned on, and the GPU test tier beside them.
#   DATA_SEED=7 SETTINGS=a,b,... [SEEDS='0 1 2'] [BEFORE=1] bash benchmarks/suite_gpu.sh
# BEFORE=1: seed 0 again with stage2.polish_soft_steps=0 (the polish without its soft phase).
# Per-seed JSON tables and the GPU tier's log come back in $OUT.
set -u
source benchmarks/gpu_env.sh
export BUNDLEFLOW_CACHE=/tmp/cache
d=${DATA_SEED:-7}
watch_gpu_memory  # the peak comes back in $OUT/gpu_peak_mib.txt
if [ "${GPU_TESTS:-1}" != 0 ]; then  # GPU_TESTS=0: skip the tier
  (python3 -m pytest -q -m gpu -p no:cacheprovider -x > "$OUT/gpu_tier.log" 2>&1; echo "gpu tier rc=$?" >> "$OUT/gpu_tier.log") &
fi
if [ -n "${EAGER_CHECK:-}" ]; then  # issue 25: a missing compiler is a finding in the report
  (CC=/nonexistent/cc CXX=/nonexistent/c++ TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) \
   TRITON_CACHE_DIR=$(mktemp -d) BUNDLEFLOW_HOME=$W/eager python3 -m bundleflow train \
   --preset default --device cuda --max-steps 200 --no-progress > "$OUT/eager_check.txt" \
   2> "$W/eager_check.log"; echo "rc=$?" >> "$OUT/eager_check.txt") &
fi
for s in ${SEEDS:-0 1 2}; do
  timeout ${SUITE_LIMIT:-520} python3 -m bundleflow suite --seeds "$s" --runs-dir "$W/seed$s" \
    ${SETTINGS:+--settings "$SETTINGS"} --set data.seed="$d" --set data.catalogue_seed="$d" \
    --json > "$OUT/suite_seed$s.json" 2> "$W/suite_seed$s.log" &
done
if [ -n "${BEFORE:-}" ]; then  # the same settings without the polish's soft phase, seed 0
  timeout ${SUITE_LIMIT:-520} python3 -m bundleflow suite --seeds 0 --runs-dir "$W/before0" \
    ${SETTINGS:+--settings "$SETTINGS"} --set data.seed="$d" --set data.catalogue_seed="$d" \
    --set stage2.polish_soft_steps=0 --json > "$OUT/suite_before_seed0.json" \
    2> "$W/suite_before_seed0.log" &
fi
wait
gpu_memory_peak
keep
tail -3 "$OUT/gpu_tier.log" 2>/dev/null
echo "GPU memory peak (MiB, all processes): $(cat "$OUT/gpu_peak_mib.txt")"
for s in ${SEEDS:-0 1 2}; do echo "seed $s: $(wc -c < "$OUT/suite_seed$s.json") bytes of JSON"; done
