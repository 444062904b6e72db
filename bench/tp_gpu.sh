#!/usr/bin/env bash
# Tensor-parallel benchmark on a multi-GPU device machine (NCCL, one GPU per rank). From the repo root
# there, after MLX's CUDA build is staged (../shared/tools/gpu-prep; docs/tp.md has the exact calls):
#
#   bash bench/tp_gpu.sh PLAN NAME [bench/tp_gpu.py options]
#
# PLAN: comma list of shape:tp (tiny, llama3-8b, llama3-70b), each run in its own process; writes
# $OUT/NAME.json (merged, with scaling vs tp 1), $OUT/NAME-<shape>-tp<N>.json and $OUT/NAME.log.
set -uo pipefail
PLAN=${1:?usage: bash bench/tp_gpu.sh PLAN NAME [options]}
NAME=${2:?usage: bash bench/tp_gpu.sh PLAN NAME [options]}
shift 2
OUT=${OUT:-bench/results}
cd "$(dirname "$0")/.."
# NVLink multicast stays off in NCCL, PyTorch and NVSHMEM (shared GPU hosts require it); the ranks inherit it.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
source bench/device_env.sh
if [ -z "${JANG_COMMIT:-}" ] && git rev-parse HEAD >/dev/null 2>&1; then
  export JANG_COMMIT=$(git rev-parse HEAD)$(git diff --quiet HEAD 2>/dev/null || echo -dirty)
fi
# MLX's CUDA build links libnccl.so.2: if the loader cannot find one, use the image's NCCL wheel.
if ! python3 -c 'import ctypes; ctypes.CDLL("libnccl.so.2")' 2>/dev/null; then
  lib=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))' 2>/dev/null)
  [ -n "$lib" ] && export LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
mkdir -p "$OUT"
{
  nvidia-smi -L
  python3 -c 'import mlx.core as mx; print("mlx", mx.__version__, mx.default_device(), "nccl:", mx.distributed.is_available("nccl")); assert mx.default_device() == mx.gpu, "MLX sees no GPU (stage it first)"' \
    && python3 bench/tp_gpu.py "$OUT/$NAME.json" --plan "$PLAN" --commit "${JANG_COMMIT:-}" "$@"
} 2>&1 | tee "$OUT/$NAME.log"
exit "${PIPESTATUS[0]}"
