#!/usr/bin/env bash
# Device side of bench/quality_gpu.py (run from the repo root on the device machine):
#   bash bench/quality_gpu.sh setup                  wheels of .qstage/w -> /tmp/site, checks MLX CUDA
#   bash bench/quality_gpu.sh piece K                keep GGUF piece K (.qstage/pK) in /tmp/q
#   bash bench/quality_gpu.sh launch NAME MODEL...   snapshot the repo, start the run in the background
#   bash bench/quality_gpu.sh wait SECONDS NAME...   wait for runs (at most SECONDS), copy results to $OUT
# A launched run lives in its own session (setsid), so it outlives the device call that started it.
set -euo pipefail
cmd=$1; shift
case "$cmd" in
setup)
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .qstage/w/*.whl
  PYTHONPATH=/tmp/site python3 - <<'PY'
import mlx.core as mx, gguf, torch
print("mlx", mx.__version__, mx.default_device(), "torch cuda", torch.cuda.is_available())
for b in (2, 3, 4, 5, 6, 8):
    w = mx.random.normal((64, 256))
    d = mx.dequantize(*mx.quantize(w, group_size=64, bits=b), group_size=64, bits=b)
    print("bits", b, "max err", float(mx.abs(d - w).max()))
H = mx.random.normal((512, 512)); H = H @ H.T + mx.eye(512)
print("cpu cholesky ok", float(mx.linalg.cholesky(H, stream=mx.cpu).sum()) != 0)
PY
  source bench/device_env.sh
  PYTHONPATH="$PYTHONPATH:/tmp/site" python3 - <<'PY'
import numpy as np
import jang_serve, mlx.core as mx
from jang_serve.quantize import gptq
from jang_serve.engine.loader import gguf  # noqa: F401
x = np.random.rand(3000, 896)
U = gptq._upper_chol_of_inverse(x.T @ x)
print("GPTQ Cholesky via torch:", gptq._cuda_torch() is not None, U.shape, bool(np.isfinite(U).all()))
PY
  ;;
piece)
  mkdir -p /tmp/q && cp ".qstage/p$1/piece" "/tmp/q/p$1" && du -cb /tmp/q/p* | tail -1
  ;;
launch)
  name=$1; shift
  snap=/tmp/qrepo-$name out=/tmp/qout-$name
  rm -rf "$snap" "$out"; mkdir -p "$snap/.qstage" "$out"
  cp -r bench engine kernels quantize server jang_serve tests "$snap/"
  cp -r .qstage/ids "$snap/.qstage/"
  mkdir -p "/tmp/shim-$name/jang_serve"; cp -r jang_serve/. "/tmp/shim-$name/jang_serve/"
  for d in engine kernels quantize server; do ln -sfn "$snap/$d" "/tmp/shim-$name/jang_serve/$d"; done
  cd "$snap"
  PYTHONUNBUFFERED=1 JANG_SERVE_NO_OPENBLAS=1 PYTHONPATH="/tmp/shim-$name:/tmp/site" \
    setsid nohup ${PY:-python3} bench/quality_gpu.py run --out "$out" --work /tmp/qwork --models "$@" ${JOBS:+--jobs $JOBS} ${EXTRA:-} \
    > "$out/log" 2>&1 < /dev/null &
  echo $! > "$out/pid"; sleep 20; cat "$out/log"
  ;;
wait)
  secs=$1; shift
  end=$((SECONDS + secs))
  while [ $SECONDS -lt $end ]; do
    alive=0
    for n in "$@"; do kill -0 "$(cat /tmp/qout-$n/pid)" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && break
    sleep 5
  done
  for n in "$@"; do
    echo "== $n"; tail -n 25 "/tmp/qout-$n/log"
    [ -f "/tmp/qout-$n/rows.json" ] && cp "/tmp/qout-$n/rows.json" "$OUT/$n-rows.json"
    cp "/tmp/qout-$n/log" "$OUT/$n.log"
  done
  nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader || true
  ;;
esac
