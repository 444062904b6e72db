# Source on the device machine (from the repo root) before running a bench script:
#   makes `import jang_serve.*` work without installing (a shim package of symlinks), restores
#   MLX's PTX cache from .ptx/ptx.tgz when carried, and sets unbuffered output.
export PYTHONUNBUFFERED=1 JANG_SERVE_NO_OPENBLAS=1
mkdir -p /tmp/shim/jang_serve
cp -r jang_serve/. /tmp/shim/jang_serve/
for d in engine kernels quantize server; do ln -sfn "$PWD/$d" "/tmp/shim/jang_serve/$d"; done
export PYTHONPATH=/tmp/shim${PYTHONPATH:+:$PYTHONPATH}
if [ -f .ptx/ptx.tgz ] && [ ! -d /tmp/mlx ]; then tar xzf .ptx/ptx.tgz -C /tmp; fi
