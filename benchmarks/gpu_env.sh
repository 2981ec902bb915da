# Sourced by the runners in benchmarks/ on a lent GPU machine (repository root as the working
# directory): the carried wheels (.whl: loguru, python-dotenv), the environment, and where the
# results go. scripts/ import bundleflow from the tree through PYTHONPATH.
site=
[ -d .whl ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
  --upgrade --target /tmp/site .whl/*.whl && site=/tmp/site:
export PYTHONPATH=$site$PWD
export PYTHONUNBUFFERED=1 BUNDLEFLOW_HOME=/tmp/bf TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
[ -d .shared ] && export BUNDLEFLOW_SHARED=$PWD/.shared
W=/tmp/w; mkdir -p $W
# keep: the results without data, weights, plots or checkpoints, as $OUT/results.tgz
keep() { (cd /tmp && tar -czf "$OUT/results.tgz" --exclude='*.safetensors' --exclude='*.pt' \
  --exclude='*.png' --exclude='checkpoints' w); }
# run_preset NAME PRESET ARGS...: one training run in its own runs root, one line of results
run_preset() {
  local n=$1 p=$2; shift 2
  BUNDLEFLOW_HOME=/tmp/w/$n timeout ${RUN_TIMEOUT:-110} python3 -m bundleflow train --preset $p --no-progress \
    "$@" > "$W/$n.log" 2>&1; keep
  echo "$n: $(grep -h 'menu / best' $W/$n.log) | $(grep -h '^time:' $W/$n.log)"
}
# watch_gpu_memory: the GPU's memory in use every 0.5 s (all processes) into $W/smi.txt, in the
# background and out of the job table (a bare `wait` does not wait for it); gpu_memory_peak: stop
# watching, the peak (MiB) into $OUT/gpu_peak_mib.txt and the series into $OUT/gpu_memory.csv.
watch_gpu_memory() {
  nvidia-smi --query-gpu=timestamp,memory.used --format=csv,noheader,nounits -lms 500 \
    > $W/smi.txt 2>/dev/null &
  SMI=$!; disown $SMI
}
gpu_memory_peak() {
  kill $SMI 2>/dev/null
  cut -d, -f2 $W/smi.txt | sort -n | tail -1 > "$OUT/gpu_peak_mib.txt"
  cp $W/smi.txt "$OUT/gpu_memory.csv"
}
