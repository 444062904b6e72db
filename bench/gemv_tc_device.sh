#!/usr/bin/env bash
# The tensor-core GEMV sequence on the device machine, after the MLX CUDA wheel is installed:
#   bash bench/gemv_tc_device.sh [parity,time] [ncu]
# Results in $OUT: gemv-tc.json (parity + queued timings), ncu.csv (GPU time per kernel, one row).
set -o pipefail
python3 -c 'import mlx.core as mx; print("mlx", mx.__version__, mx.default_device())' || exit 3
source bench/device_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
modes=${1:-parity,time}
if [ -n "$modes" ] && [ "$modes" != none ]; then
  timeout ${GT_TIMEOUT:-400} python3 bench/kernels_gemv_tc.py "$OUT/gemv-tc.json" ${modes//,/ } 2>&1 | tee "$OUT/gemv-tc.log" \
    | grep -v "^{'epi'" | cut -c1-300
  echo "kernels_gemv_tc rc=$?"
fi
if [ "${2:-}" = ncu ]; then
  timeout ${NCU_TIMEOUT:-150} ncu --clock-control none --profile-from-start off \
    --metrics gpu__time_duration.sum,dram__bytes_read.sum,smsp__inst_executed.sum,launch__registers_per_thread,launch__grid_size,launch__block_size \
    --csv --log-file "$OUT/ncu.csv" python3 bench/kernels_gemv_tc.py - ncu > "$OUT/ncu.log" 2>&1
  echo "ncu rc=$?"; tail -3 "$OUT/ncu.log"
  ncu_rows "$OUT/ncu.csv" gpu__time_duration.sum
fi
