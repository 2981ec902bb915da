# Sourced by the benchmarks/gpu_*.sh scripts on a lent GPU machine (repository root as the
# working directory): the carried wheels (.whl: loguru, python-dotenv) and the environment.
[ -d .whl ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
  --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
export PYTHONUNBUFFERED=1 BUNDLEFLOW_HOME=/tmp/bf TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
[ -d .shared ] && export BUNDLEFLOW_SHARED=$PWD/.shared
W=/tmp/w; mkdir -p $W
save() { tar -C /tmp -czf "$OUT/results.tgz" w; }
# keep: the results without data, weights, plots or checkpoints (issue-17 scripts onwards)
keep() { (cd /tmp && tar -czf "$OUT/results.tgz" --exclude='*.safetensors' --exclude='*.pt' \
  --exclude='*.png' --exclude='checkpoints' w); }
# run_preset NAME PRESET ARGS...: one training run in its own runs root, one line of results
run_preset() {
  local n=$1 p=$2; shift 2
  BUNDLEFLOW_HOME=/tmp/w/$n timeout ${RUN_TIMEOUT:-110} python3 -m bundleflow train --preset $p --no-progress \
    "$@" > "$W/$n.log" 2>&1; keep
  echo "$n: $(grep -h 'menu / best' $W/$n.log) | $(grep -h '^time:' $W/$n.log)"
}
