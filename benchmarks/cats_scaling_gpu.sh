#!/usr/bin/env bash
# Real finite menus against bundle-size pricing on CATS as the menu grows, on one lent GPU
# (issue 27; scripts/cats_menu_scaling.py): the cover model's tiered design and unions of
# training atoms, J up to 10^7, 20,000 held-out bidders, one process per data set.
#   [SIZES=100000,1000000,10000000] [SETS='arbitrary:50 regions:50 arbitrary:100'] \
#     bash benchmarks/cats_scaling_gpu.sh
set -u
source benchmarks/gpu_env.sh
for set in ${SETS:-arbitrary:50 regions:50 arbitrary:100}; do
  dist=${set%:*} m=${set#*:}
  (python3 -m bundleflow data generate --dist "$dist" --items "$m" --n 40000 --seed 0 \
     --out "$W/$dist$m.safetensors" --no-progress > /dev/null 2>&1 &&
   python3 scripts/cats_menu_scaling.py "$W/$dist$m.safetensors" --device cuda \
     --design tiers --chunk 5000 --menu-sizes "${SIZES:-100000,1000000,10000000}" \
     > "$OUT/scaling_${dist}${m}_tiers.txt" 2>&1) &
done
wait
for f in "$OUT"/scaling_*.txt; do echo "== $f"; grep -v DEBUG "$f"; done
