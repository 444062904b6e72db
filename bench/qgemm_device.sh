#!/usr/bin/env bash
# The qgemm sequence on the device machine (after the MLX CUDA wheel is installed), from the repo root:
#   bash bench/qgemm_device.sh [parity] [gemm] [gputime]
# parity: bench/kernels_parity_cuda.py qgemm section; gemm: the queued timings (kernels_bench.py gemm
# section); gputime: GPU time per call under Nsight Compute (bench/qgemm_gputime.py). Results in $OUT.
set -o pipefail
source bench/device_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
what=${*:-parity gemm gputime}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
for w in $what; do
  case $w in
    parity) KP_QUICK=${QUICK:-0} python3 bench/kernels_parity_cuda.py "$OUT/parity-qgemm.json" qgemm 2>&1 | tee "$OUT/parity.log" | tail -25 ;;
    gemm) KB_SECTIONS=gemm python3 bench/kernels_bench.py "$OUT/gemm.json" ${QUICK:+$([ "$QUICK" = 1 ] && echo quick)} 2>&1 | tee "$OUT/gemm.log" | grep -v "^gemm n=" ;;
    gputime) ncu --profile-from-start off --metrics gpu__time_duration.sum --csv --log-file "$OUT/ncu.csv" \
               python3 bench/qgemm_gputime.py "$OUT/gputime-cases.json" ${QUICK:+$([ "$QUICK" = 1 ] && echo quick)} > "$OUT/gputime.log" 2>&1
             python3 bench/qgemm_gputime.py --summarize "$OUT/ncu.csv" "$OUT/gputime-cases.json" "$OUT/gputime.json" ;;
  esac
done
