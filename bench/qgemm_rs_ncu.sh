#!/usr/bin/env bash
# On the device (repo root, MLX installed): Nsight Compute on the register-operand GEMM at 64 and 256 rows
# (14336x4096, 4 bits): speed of light, warp states, and the stall reasons sampled per SASS instruction.
#   bash bench/qgemm_rs_ncu.sh     -> $OUT/rs-details.csv, $OUT/rs-source.csv, $OUT/rs-raw.csv
set -u
source bench/device_env.sh
cd bench
timeout ${NCU_TIMEOUT:-300} ncu --clock-control none --profile-from-start off -k regex:jang_qgemm_rs \
  --section SpeedOfLight --section WarpStateStats --section SourceCounters --section ComputeWorkloadAnalysis \
  --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats --section SchedulerStats \
  --export "$OUT/rs" --force-overwrite python3 qgemm_wg_bench.py - ncu_rs > "$OUT/ncu.log" 2>&1
echo "ncu rc=$?"; tail -3 "$OUT/ncu.log"
ncu --import "$OUT/rs.ncu-rep" --page details --csv > "$OUT/rs-details.csv" 2>&1; echo "details rc=$?"
ncu --import "$OUT/rs.ncu-rep" --page source --print-source sass --csv > "$OUT/rs-source.csv" 2>&1
echo "source rc=$?"; head -c 600 "$OUT/rs-source.csv"; echo
ncu --import "$OUT/rs.ncu-rep" --page raw --csv > "$OUT/rs-raw.csv" 2>&1; echo "raw rc=$?"
ls -la "$OUT"
