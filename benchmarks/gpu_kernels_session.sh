#!/usr/bin/env bash
# BENCHMARKS.md "2026-11-26 (session 3)": the fused/compiled Stage-2 kernels on a lent GPU.
# Repository root as working directory, results under $OUT (tarred: the tool returns 8 files).
#   part a: GPU test tier, kernels side by side, `bundleflow bench` with the default kernels
#   part b: paper-m50 Stage 2 (cached flows in $BUNDLEFLOW_CACHE): time to revenue with the
#           default kernels, and the Stage-1 lr schedule (constant vs cosine flow), 3 seeds
set -u
part=${1:-a}
export BUNDLEFLOW_HOME=$PWD/.gpu_runs BUNDLEFLOW_CACHE=$PWD/.gpu_cache PYTHONUNBUFFERED=1
R=$PWD/.gpu_runs
W=$OUT/w; mkdir -p "$W"
save() { tar -C "$OUT" -czf "$OUT/results-$part.tgz" w; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$W/gpu.txt"
python3 -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)" >> "$W/gpu.txt" 2>&1

if [ "$part" = a ]; then
for cfg in "50 fp32" "50 bf16" "500 bf16" "500 fp32"; do
  set -- $cfg
  python3 scripts/bench_kernels.py --items "$1" --precision "$2" --steps 100 \
    > "$W/kernels_m$1_$2.jsonl" 2> "$W/kernels_m$1_$2.err"; save
done
for m in 50 500; do
  python3 -m bundleflow bench --items "$m" --precision bf16 --steps 100 --json \
    > "$W/bench_m${m}_bf16.json" 2>> "$W/bench.err"; save
done
python3 -m bundleflow bench --items 500 --menu 20000 --batch 512 --precision bf16 --steps 20 \
  --json > "$W/bench_m500_J20000_B512_bf16.json" 2>> "$W/bench.err"; save
python3 scripts/profile_step.py --items 500 --precision bf16 --kernels compiled \
  > "$W/profile_m500_bf16_compiled.txt" 2>&1; save
python3 -m pytest -q -m gpu -p no:cacheprovider tests/ > "$W/gpu_tests.log" 2>&1; save
fi

if [ "$part" = b ]; then
# Stage 2 of paper-m50 on the cached Stage-1 flows (constant lr: the default; cosine), 3 seeds
# each, all six at once on the one GPU (wall times are then not step times; 2 CPU threads
# each: with 16 each, six processes' CPU baselines crawled past the call's 10 minutes).
for lr in constant cosine; do
  for seed in 0 1 2; do
    OMP_NUM_THREADS=2 timeout 400 python3 -m bundleflow train --preset paper-m50 --no-progress --set stage2.seed=$seed \
      --set stage1.lr_schedule=$lr --runs-dir "$R/$lr-$seed" > "$W/paper_${lr}_${seed}.log" 2>&1 &
  done
done
wait
for d in "$R"/*-*/; do
  name=$(basename "$d"); r=$(ls -d "$d"*/ | head -1)
  cp "$r/report.json" "$W/paper_${name}_report.json" 2>/dev/null
  cp "$r/metrics.jsonl" "$W/paper_${name}_metrics.jsonl" 2>/dev/null
done
save
# Time to revenue alone on the GPU with the default kernels (compiled) and the plain ones.
for k in compiled plain; do
  timeout 150 python3 -m bundleflow train --preset paper-m50 --no-progress --set stage2.kernels=$k \
    --runs-dir "$R/alone-$k" > "$W/paper_alone_$k.log" 2>&1
  r=$(ls -d "$R"/alone-$k/*/ | head -1); cp "$r/metrics.jsonl" "$W/paper_alone_${k}_metrics.jsonl"
  cp "$r/report.json" "$W/paper_alone_${k}_report.json"; save
done
fi
save
echo done
