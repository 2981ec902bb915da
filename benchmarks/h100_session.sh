#!/usr/bin/env bash
# What BENCHMARKS.md's H100 numbers of 2026-11-25/26 came from: one call on a lent H100 (the
# repository root as working directory, results under $OUT). Data sets come pre-generated
# in $BUNDLEFLOW_CACHE (same content keys as `bundleflow train` generates itself).
# Two calls (a call may run 10 minutes): `bash benchmarks/h100_session.sh a`, then `... b` on
# the same warm machine (runs and the Stage-1 flow cache live in ignored folders of the tree).
set -u
part=${1:-a}
export BUNDLEFLOW_HOME=$PWD/.gpu_runs BUNDLEFLOW_CACHE=$PWD/.gpu_cache PYTHONUNBUFFERED=1
R=$PWD/.gpu_runs
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt"
python3 -c "import torch; print(torch.__version__, torch.version.cuda)" >> "$OUT/gpu.txt"

if [ "$part" = a ]; then
# 1. The GPU test tier.
python3 -m pytest -q -m gpu -p no:cacheprovider tests/ > "$OUT/gpu_tests.log" 2>&1

# 2. bench at paper size and m=500, each precision of the fast path's flow network.
for m in 50 500; do
  for prec in fp32 tf32 bf16; do
    python3 -m bundleflow bench --items "$m" --precision "$prec" --steps 100 --json \
      > "$OUT/bench_m${m}_${prec}.json" 2>> "$OUT/bench.err"
  done
done
python3 -m bundleflow bench --items 500 --menu 20000 --batch 512 --precision bf16 --steps 20 \
  --json > "$OUT/bench_m500_J20000_B512_bf16.json" 2>> "$OUT/bench.err"

# 3. Time to revenue: paper-m50 (Stage 1 from scratch, then Stage 2), alone on the GPU.
python3 -m bundleflow train --preset paper-m50 --no-progress --runs-dir $R/alone \
  > "$OUT/paper_alone.log" 2>&1
run=$(ls -d "$R"/alone/*/ | head -1)
cp "$run/metrics.jsonl" "$OUT/paper_alone_metrics.jsonl"; cp "$run/report.json" "$OUT/paper_alone_report.json"

fi
if [ "$part" = b ]; then
run=$(ls -d "$R"/alone/*/ | head -1)
# 4. Precision on one frozen menu, then paper-m50 Stage 2 for 3 seeds x {no, bf16, fp16}
#    (the cached flow of step 3; 8 runs share the GPU at once, so their wall times are not
#    step times: those are in step 2).
python3 scripts/precision_parity.py "$run" > "$OUT/precision_parity.json" 2>> "$OUT/parity.err"
for prec in no bf16 fp16; do
  for seed in 0 1 2; do
    [ "$prec" = no ] && [ "$seed" = 0 ] && continue
    python3 -m bundleflow train --preset paper-m50 --no-progress --mixed-precision "$prec" \
      --set stage2.seed="$seed" --runs-dir "$R/$prec-$seed" \
      > "$OUT/paper_${prec}_${seed}.log" 2>&1 &
  done
done
wait
for d in "$R"/*-*/; do
  name=$(basename "$d"); r=$(ls -d "$d"*/ | head -1)
  cp "$r/report.json" "$OUT/paper_${name}_report.json" 2>/dev/null
  cp "$r/metrics.jsonl" "$OUT/paper_${name}_metrics.jsonl" 2>/dev/null
done

# 5. Memory over 30,000 Stage-2 steps at paper size (graph step).
python3 scripts/leak_check.py --device cuda --steps 30000 --items 50 --menu-size 5000 \
  --support 8 --batch 128 --hidden 128 --step graph > "$OUT/leak_paper.json" 2> "$OUT/leak.err"
fi
echo done
