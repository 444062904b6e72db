"""Register-operand warpgroup GEMM (RS) for MLX's affine packed weights on Hopper (sm_90a).

y[M, N] = x[M, K] @ dequant(w)[N, K].T for up to 256 rows of x; same inputs and dtypes as
kernels/qgemm_wg_cuda.py (2/4/8 bits, groups 32/64/128, bf16/fp16, scales in x's dtype).

Why: the shared-memory-operand kernel (qgemm_wg) dequantizes each weight tile into shared memory and the
wgmmas read it back, per m64 tile of rows: at 256 rows its shared-memory traffic per stage exceeds what the
MMAs take. Here the product is computed transposed, y.T = W x.T, so the weights are wgmma's A operand,
which may come from registers: each thread dequantizes exactly the fragment it feeds to the tensor cores
and the dequantized weights never touch shared memory. x is the B operand (n = the row tile, up to 256)
from shared memory, read once per k16 step by each warpgroup.

- **Block** = CW warpgroups (default 2), 64 output features each (wgmma m64) by R rows of x (n; a multiple
  of 32 up to 256: one block covers every row of a 96-256-row call); split-K over grid z when too few
  blocks fill the GPU (fp32 partials, qgemm_cuda's reduce kernel).
- **Pipeline**: K in stages of 64 through a STAGES-slot cp.async ring (x tile with the 128-byte swizzle,
  the packed weight rows with their 16-byte chunks XOR-permuted across a 128-byte line), STAGES-1 stages
  ahead. Step i issues stage i's 4 wgmmas (m64nRk16, A in registers), then, while they run, waits for
  stage i+1, refills the slot of stage i-1, and dequantizes stage i+1's fragments into the other register
  set; wait_group 0 closes the step. (Keeping a second stage in flight instead would make ptxas serialize
  the wgmmas: their A registers would be written inside the window of a wgmma in flight.)
- **Fragments**: thread (g = lane/4, c = lane%4) of warp w holds rows 16w+g and +8 and K pairs (2c, 2c+1)
  and (2c+8, 2c+9) of each k16 step. Packed words keep K in order, so at 4 bits one byte permute gathers
  byte c of a word pair, two mask-ors put both nibble pairs under the magic exponent, one packed sub and
  one packed fma per pair give the values (one rounding, as the reference), two permutes order them.
- **Epilogue**: the accumulators hold y.T; lanes g and g^1 swap halves (one shuffle per pair) so each
  stores two adjacent features of one row (32-bit stores; fp32 pairs for split-K partials).
"""

from __future__ import annotations

import os

import mlx.core as mx

from . import nvrtc, qgemm_wg_cuda
from .qgemm_rs_source import kernel_name, source

BK = 64
TARGET_BLOCKS = 132
SMEM_MAX = 227 * 1024
MAX_ROWS = 256


def supports(x: mx.array, w: mx.array, bits: int, group_size: int, scales_dtype=None) -> bool:
    """What qgemm_wg takes (2/4/8 bits, groups 32/64/128, bf16/fp16 with scales of the same dtype, K % 64,
    N % 128): the same operands and tile widths."""
    return qgemm_wg_cuda.supports(x, w, bits, group_size, scales_dtype)


def smem_bytes(bits: int, r: int, stages: int, cw: int = 2) -> int:
    return stages * (r * BK * 2 + 64 * cw * BK * bits // 8)


def config(m: int, n: int, k: int, bits: int, r: int | None = None, stages: int | None = None,
           split: int | None = None, target: int | None = None, cw: int | None = None) -> dict:
    cw = cw or int(os.environ.get("JANG_QGEMM_RS_CW", 0)) or 2
    bf = 64 * cw
    r = r or min(MAX_ROWS, -(-m // 32) * 32)
    if r % 32 or r > MAX_ROWS:
        raise ValueError(f"qgemm_rs: a row tile of {r} (a multiple of 32, at most {MAX_ROWS})")
    if n % bf or k % BK:
        raise ValueError(f"qgemm_rs: N={n} is not a multiple of {bf} or K={k} of {BK}")
    st = stages or int(os.environ.get("JANG_QGEMM_RS_STAGES", 0)) or 4
    if st < 3 or smem_bytes(bits, r, st, cw) > SMEM_MAX:
        raise ValueError(f"qgemm_rs: {st} stages do not fit")
    if split is None:
        blocks, split = -(-m // r) * (n // bf), 1
        while blocks * split * 2 <= (target or TARGET_BLOCKS) and k % (BK * split * 2) == 0 \
                and k // (split * 2) >= 4 * BK:
            split *= 2
    if k % (BK * split):
        raise ValueError(f"qgemm_rs: K={k} does not split into {split} parts of whole {BK}-wide stages")
    return dict(R=r, stages=st, split=split, CW=cw)


def config_args(overrides: dict) -> dict:
    """qgemm()'s overrides (R, CW, stages, split, target) as config() keywords."""
    return {a.lower() if a in ("R", "CW") else a: v for a, v in overrides.items()}


_cubins: dict[tuple, bytes] = {}


def cubin(bits: int, group_size: int, bf16: bool, r: int, stages: int, split: bool, cw: int = 2):
    key = (bits, group_size, bf16, r, stages, split, cw)
    if key not in _cubins:
        _cubins[key] = nvrtc.compile_cubin(source(*key), kernel_name(*key))
    return kernel_name(*key), _cubins[key]


def _launch(cfg, m, n, dtype, bits, group_size, partials: bool = False):
    r, st, s, cw = cfg["R"], cfg["stages"], cfg["split"], cfg["CW"]
    name, code = cubin(bits, group_size, dtype == mx.bfloat16, r, st, s > 1 or partials, cw)
    nth = 128 * cw
    grid = (-(-m // r) * nth, n // (64 * cw), s)
    return qgemm_wg_cuda.launcher(name, code, grid, nth, smem_bytes(bits, r, st, cw), m, n, s, dtype, partials)


def qgemm(x2d: mx.array, w: mx.array, scales: mx.array, biases: mx.array, bits: int, group_size: int,
          **overrides) -> mx.array:
    """x2d [M, K] bf16/fp16 -> [M, N] in x's dtype. overrides: R, stages, split, target, CW (config)."""
    m, k = x2d.shape
    cfg = config(m, w.shape[0], k, bits, **config_args(overrides))
    return _launch(cfg, m, w.shape[0], x2d.dtype, bits, group_size)(x2d, w, scales, biases)


def plan(m: int, n: int, k: int, dtype, bits: int, group_size: int):
    """f(x2d, w, scales, biases) -> y with the launch arguments computed once (compiles the cubin if needed)."""
    return _launch(config(m, n, k, bits), m, n, dtype, bits, group_size)


def plan_partials(m: int, n: int, k: int, dtype, bits: int, group_size: int):
    """f(x2d, w, scales, biases) -> fp32 partial sums [split, m, n] of plan's configuration (split may be 1)."""
    return _launch(config(m, n, k, bits), m, n, dtype, bits, group_size, partials=True)


_checked: dict[tuple, bool] = {}


def self_test(dtype, bits: int, group_size: int) -> tuple[bool, str]:
    """Row tiles of 96-256 (partial ones too, two tiles at 300 rows), split and not."""
    return qgemm_wg_cuda.check_gemm(qgemm, dtype, bits, group_size, ((136, 1), (300, 2), (96, 1), (72, 4), (256, 1)))


def ready(dtype, sdtype, bits: int, group_size: int) -> bool:
    """Compiled and self-tested for (dtype, bits, group) on first use; a failure logs and turns it off."""
    return qgemm_wg_cuda.ready_checked("qgemm_rs", _checked, self_test, dtype, sdtype, bits, group_size)
