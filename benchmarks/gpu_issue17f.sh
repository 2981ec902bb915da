#!/usr/bin/env bash
# Issue 17, H200 calls of 2026-12-02 (fourth pass): the acceptance grid with the presets'
# recipe and the significance rule (stage2.select_min_z = 1.96): CATS arbitrary-upv and
# regions-upv m=50, data seeds 0,1,2 x training seeds 0,1,2; arbitrary-upv m=100, 3 seeds;
# additive U[0,1] m = 2..10. One run at a time (concurrent runs time-slice the GPU).
#   bash benchmarks/gpu_issue17f.sh arbitrary|regions|m100|additive
set -u
source benchmarks/gpu_env.sh
export BUNDLEFLOW_CACHE=/tmp/cache
start=$SECONDS
case "${1:?part}" in
  arbitrary|regions)
    for d in 0 1 2; do for s in 0 1 2; do
      [ $((SECONDS - start)) -gt 520 ] && break 2
      run_preset ${1}_d${d}_s$s $1-upv-m50 --set data.seed=$d --set stage1.seed=$s --set stage2.seed=$s
    done; done ;;
  m100)
    for s in 0 1 2; do
      [ $((SECONDS - start)) -gt 450 ] && break
      run_preset m100_d0_s$s arbitrary-upv-m100 --set data.seed=0 --set stage1.seed=$s --set stage2.seed=$s
    done ;;
  additive)
    for s in 0 1 2; do for m in ${M_LIST:-10 4 2 3 5 6 7 8 9}; do
      [ $((SECONDS - start)) -gt ${LIMIT:-520} ] && break 2
      run_preset add_m${m}_s$s additive-m2 --set data.n_items=$m --set menu.fallback=best \
        --set menu.posted_price_init=true --set flow.log_std=-1 --set stage1.seed=$s \
        --set stage2.seed=$s --set data.seed=$s
    done; done ;;
esac
