#!/usr/bin/env bash
# Issue 27: the learned menu alone on CATS with and without an element that starts at the grand
# bundle (`menu.grand_bundle_element`), on one lent GPU. For each training seed S: Stage 1 once
# (stage1.seed=S, cached), then Stage 2 + report twice side by side, learned menu alone
# (`menu.fallback=none`, `menu.posted_price_init=false`), grand-bundle start on / off.
# PRESET_TOO=1 adds the preset as shipped (posted price beside the menu) with the start on, seed 0.
# VARIANTS (optional) replaces the on/off pair: 'NAME:KEY=VALUE,KEY=VALUE NAME:…', each variant
# one learned-menu-alone run per seed with those --set keys.
#   PRESETS='arbitrary-upv-m150 …' DATA_SEED=1 [SEEDS='0 1 2'] [GPU_TESTS=1] \
#     [VARIANTS='gb:menu.grand_bundle_element=true r09:menu.init_inclusion=0.9'] \
#     bash benchmarks/cats_grand_gpu.sh
# .bfcache (carried, optional): a $BUNDLEFLOW_CACHE to start from (data, fitted baselines).
# One result line per run; logs and reports (no weights) come back in $OUT/results.tgz.
set -u
source benchmarks/gpu_env.sh
export BUNDLEFLOW_CACHE=/tmp/cache
mkdir -p $BUNDLEFLOW_CACHE
[ -d .bfcache ] && cp -r .bfcache/. $BUNDLEFLOW_CACHE/
d=${DATA_SEED:-1}
watch_gpu_memory  # the peak comes back in $OUT/gpu_peak_mib.txt
export RUN_TIMEOUT=${RUN_TIMEOUT:-420}
if [ "${GPU_TESTS:-0}" != 0 ]; then
  (python3 -m pytest -q -m gpu -p no:cacheprovider > "$OUT/gpu_tier.log" 2>&1
   echo "gpu tier rc=$?" >> "$OUT/gpu_tier.log") &
fi
# the data sets (and their baselines, unless carried) once, before the processes that share them
python3 -c "
import sys, torch
from bundleflow.train.config import load_config, parse_set
from bundleflow.train.data import load_run_data
for p in sys.argv[1:]:
    load_run_data(load_config(p, parse_set(['data.seed=$d'])).data, torch.device('cpu')).baselines()
" ${PRESETS:?PRESETS} > $W/data.log 2>&1
s1=()
for p in ${PRESETS:?PRESETS}; do
  for s in ${SEEDS:-0 1 2}; do
    BUNDLEFLOW_HOME=$W/s1-$p-$s python3 -m bundleflow train-stage1 --preset $p --no-progress \
      --set data.seed=$d --set stage1.seed=$s > "$W/s1-$p-$s.log" 2>&1 &
    s1+=($!)
  done
done
wait "${s1[@]}"
runs=()
alone="--set menu.fallback=none --set menu.posted_price_init=false"
for p in ${PRESETS}; do
  for s in ${SEEDS:-0 1 2}; do
    for v in ${VARIANTS:-gbtrue:menu.grand_bundle_element=true gbfalse:menu.grand_bundle_element=false}; do
      sets=$(echo "${v#*:}" | tr ',' '\n' | sed 's/^/--set /' | tr '\n' ' ')
      run_preset "$p-d$d-s$s-${v%%:*}" $p --set data.seed=$d --set stage1.seed=$s \
        --set stage2.seed=$s $alone $sets &
      runs+=($!)
    done
  done
  if [ -n "${PRESET_TOO:-}" ]; then
    run_preset "$p-d$d-s0-preset-gbtrue" $p --set data.seed=$d \
      --set stage1.seed=0 --set stage2.seed=0 --set menu.grand_bundle_element=true &
    runs+=($!)
  fi
done
wait "${runs[@]}"
gpu_memory_peak
keep
for f in $W/*.log; do
  n=$(basename $f .log)
  case $n in s1-*) echo "$n: $(grep -h 'stage 1:' $f | head -1)";; *)
    echo "$n: $(grep -h '^learned menu \|^grand bundle ' $f | tr -s ' ' | tr '\n' '|') $(grep -h 'best validation' $f | tail -1 | cut -c 1-120) $(grep -h '^time:' $f)";;
  esac
done
echo "GPU memory peak (MiB, all processes): $(cat $OUT/gpu_peak_mib.txt)"
wait  # the GPU tier, if on
tail -3 "$OUT/gpu_tier.log" 2>/dev/null
