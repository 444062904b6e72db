#!/usr/bin/env bash
# The serving side-by-side on the GPU machine: jang-serve vs mlx_lm.server 0.32.2 on the same
# SmolLM2-135M-Instruct JANG bundle, 1/4/16/64 clients, 3 interleaved repeats (bench/serve.py).
#
#   bash bench/serve_gpu.sh MODEL        # run from the repo root on the device
#
# MODEL: the SmolLM2 .gguf (converted once to JANG_4L:mse:g32 under $JANG_SERVE_HOME) or a JANG bundle
# folder. Writes $OUT/serve-gpu.json (OUT defaults to bench/results) and the servers' logs next to it.
# Needs the wheels of bench/gpu_wheels.txt besides the image's packages; nothing is downloaded.
# Set JANG_SERVE_COMMIT=<sha> to record the commit when the copy has no .git.
set -euo pipefail
MODEL=${1:?usage: bash bench/serve_gpu.sh MODEL (.gguf or JANG bundle folder)}
OUT=${OUT:-bench/results}
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."
if [ -z "${JANG_SERVE_COMMIT:-}" ] && git rev-parse HEAD >/dev/null 2>&1; then
  export JANG_SERVE_COMMIT=$(git rev-parse HEAD)$(git diff --quiet HEAD 2>/dev/null || echo -dirty)
fi
source bench/device_env.sh                       # import jang_serve.* without installing
export JANG_SERVE_HOME=${JANG_SERVE_HOME:-/tmp/jang-serve-home}    # the converted bundle
export JANG_BENCH_CACHE=${JANG_BENCH_CACHE:-/tmp/jang-bench-cache}  # mlx-lm's bfloat16 copy of it
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
"$PY" - <<'PY'
import importlib, mlx.core as mx
missing = [m for m in ("fastapi", "uvicorn", "sse_starlette", "prometheus_client", "httpx", "mlx_lm", "transformers")
           if importlib.util.find_spec(m) is None]
assert not missing, f"missing packages (see bench/gpu_wheels.txt): {missing}"
assert mx.default_device() == mx.gpu, "MLX sees no GPU here"
PY
exec "$PY" bench/serve.py --model "$MODEL" --out "$OUT/serve-gpu.json" -- --log-dir "$OUT/serve-gpu-logs" "${@:2}"
