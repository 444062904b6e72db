# Source on the device machine (from the repo root) before running a bench script:
#   makes `import jang_serve.*` work without installing (a shim package of symlinks), restores
#   MLX's PTX cache from .ptx/ptx.tgz when carried, and sets unbuffered output.
export PYTHONUNBUFFERED=1 JANG_SERVE_NO_OPENBLAS=1
mkdir -p /tmp/shim/jang_serve
cp -r jang_serve/. /tmp/shim/jang_serve/
for d in engine kernels quantize server; do ln -sfn "$PWD/$d" "/tmp/shim/jang_serve/$d"; done
export PYTHONPATH=/tmp/shim${PYTHONPATH:+:$PYTHONPATH}
# `python -m jang_serve...` (the servers, tensor-parallel followers) puts the working directory first on
# sys.path, where the repo's own jang_serve/ (without engine/ ...) shadows the shim: link the
# subpackages there too. Only on the device machine (nvidia-smi present): the copy there is scratch.
if command -v nvidia-smi >/dev/null 2>&1; then
  for d in engine kernels quantize server; do ln -sfn "$PWD/$d" "jang_serve/$d"; done
fi
if [ -f .ptx/ptx.tgz ] && [ ! -d /tmp/mlx ]; then tar xzf .ptx/ptx.tgz -C /tmp; fi

# ncu_rows CSV [METRIC]: kernel name, metric and value of each row of an `ncu --csv` log (only METRIC's
# rows when given).
ncu_rows() {
  python3 - "$1" "${2:-}" <<'PY'
import csv, sys
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
hdr = rows[0]; ki, mi, vi = hdr.index("Kernel Name"), hdr.index("Metric Name"), hdr.index("Metric Value")
for r in rows[1:]:
    if not sys.argv[2] or r[mi] == sys.argv[2]:
        print(r[ki][:60], r[mi], r[vi])
PY
}
