# Sourced by the benchmarks/gpu_*.sh scripts on a lent GPU machine (repository root as the
# working directory): the carried wheels (.whl: loguru, python-dotenv) and the environment.
[ -d .whl ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
  --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
export PYTHONUNBUFFERED=1 BUNDLEFLOW_HOME=/tmp/bf TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
[ -d .shared ] && export BUNDLEFLOW_SHARED=$PWD/.shared
W=/tmp/w; mkdir -p $W
save() { tar -C /tmp -czf "$OUT/results.tgz" w; }
