#!/usr/bin/env bash
# The scalar GEMV against an earlier body of itself on the device machine (MLX CUDA installed), one process:
#   GS_BEFORE=FILE bash bench/gemv_ab_device.sh [sweep,parity,fused,decode,ncu]
# FILE: an earlier commit's qmm_cuda.SOURCE (the text between its triple quotes). sweep:
# bench/kernels_gemv_sweep.py with the previous body ("impl": "before") and the shipped build interleaved twice
# (GS_BASE replaces that list), plus GS_EXTRA (JSON list of configs); parity: kernels_parity_cuda.py qmm
# (KP_QUICK=1); fused: kernels_fused_cuda.py; decode: decode_checks.py; ncu: bench/gemv_ncu.py under Nsight
# Compute (GN_VARIANTS, GN_SHAPES) -> $OUT/ncu.csv + manifest.json (report: python3 bench/gemv_ncu.py
# manifest.json --report ncu.csv).
# Results in $OUT.
set -o pipefail
source bench/device_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
modes=${1:-sweep,parity}
base=${GS_BASE:-'[{"impl": "before"}, {"FAST": true}, {"impl": "before"}, {"FAST": true}]'}
if [[ $modes == *sweep* ]]; then
  GS_VARIANTS=$(python3 -c "import json,sys; print(json.dumps(json.loads(sys.argv[1]) + json.loads(sys.argv[2])))" \
    "$base" "${GS_EXTRA:-[]}") GS_BEFORE=$(realpath "$GS_BEFORE") \
    timeout ${GS_TIMEOUT:-240} python3 bench/kernels_gemv_sweep.py "$OUT/sweep.json" 2>&1 | tail -40 | cut -c1-260
  echo "sweep rc=$?"
fi
if [[ $modes == *parity* ]]; then
  KP_QUICK=1 timeout ${KP_TIMEOUT:-200} python3 bench/kernels_parity_cuda.py "$OUT/parity.json" qmm 2>&1 | tail -4
  echo "parity rc=$?"
fi
if [[ $modes == *fused* ]]; then
  (cd bench && timeout ${KF_TIMEOUT:-280} python3 kernels_fused_cuda.py "$OUT/fused.json" 2>&1 | tail -6)
  echo "fused rc=$?"
fi
if [[ $modes == *decode* ]]; then
  (cd bench && timeout ${DC_TIMEOUT:-200} python3 decode_checks.py "$OUT/decode.json" 2>&1 | tail -4)
  echo "decode rc=$?"
fi
if [[ $modes == *ncu* ]]; then
  (cd bench && GS_BEFORE=$(realpath "../$GS_BEFORE") timeout ${NCU_TIMEOUT:-300} ncu --clock-control none \
    -k regex:custom_kernel --metrics ${GN_METRICS:-gpu__time_duration.sum,launch__registers_per_thread,\
sm__warps_active.avg.pct_of_peak_sustained_active,smsp__issue_active.avg.pct_of_peak_sustained_active} \
    --print-units base --csv --log-file "$OUT/ncu.csv" python3 gemv_ncu.py "$OUT/manifest.json" > "$OUT/ncu.log" 2>&1)
  echo "ncu rc=$?"; tail -3 "$OUT/ncu.log"
  (cd bench && python3 gemv_ncu.py "$OUT/manifest.json" --report "$OUT/ncu.csv" "$OUT/ncu-table.json" | cut -c1-250)
fi
