#!/usr/bin/env bash
# The paged-decode (v1 vs v2) sequence on the device machine, after the MLX CUDA wheel is installed:
#   bash bench/paged_small_device.sh [parity,time] [ncu]
# Results in $OUT: paged-small.json (parity + queued timings), ncu.csv (GPU time per launch, batch 1).
set -o pipefail
source bench/device_env.sh
export JANG_PAGED_V2=1   # the plan (engine path) on v2 too
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
modes=${1:-parity,time}
timeout ${PS_TIMEOUT:-420} python3 bench/paged_small.py "$OUT/paged-small.json" "$modes" 2>&1 | tee "$OUT/paged-small.log" \
  | grep -v "^parity {" | cut -c1-400
echo "paged_small rc=$?"
if [ "${2:-}" = ncu ]; then
  timeout ${NCU_TIMEOUT:-120} ncu --clock-control none --profile-from-start off --metrics gpu__time_duration.sum,dram__bytes_read.sum \
    --csv --log-file "$OUT/ncu.csv" python3 bench/paged_small.py - ncu > "$OUT/ncu.log" 2>&1
  echo "ncu rc=$?"; tail -3 "$OUT/ncu.log"
  ncu_rows "$OUT/ncu.csv"
fi
