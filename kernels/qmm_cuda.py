"""Fused dequant + GEMV for MLX's affine packed weights on CUDA (1-8 activation rows).

Layout: w [N, K*bits/32] uint32, each row a little-endian bit stream of `bits`-bit fields;
scales / biases [N, K/group_size]; w_hat[n, k] = scale[n, k/gs] * q[n, k] + bias[n, k/gs].

Work split: a block of 128 threads holds 4/W "teams" of W warps; a team owns R output rows and
its 32*W threads stride over K in *units* (one unit = 16 bytes of packed weights at 2/4/8 bits,
32 values = 12/20/24 bytes at 3/5/6 bits; a unit never crosses a quantization group unless the
group is smaller than the unit). Each thread loads the unit of all R rows first (R independent
16-byte loads in flight), then the matching activations once, and reuses them for the R rows.
Per group it accumulates p = sum(x*q) and sum(x); the group adds scale*p + bias*sum(x).
At the end: warp-shuffle reduction, then shared memory across the W warps of a team.

FAST (2/4/8 bits): instead of shifting every field down, mask it in place inside a 16-bit half
word and turn it into a float with one three-input logic op (mask, OR the 2^23 magic) and one add
(minus 2^23); the activation is pre-scaled by 2^-(bits*j) to undo the field's position j.
At 2 and 4 bits (NOSUB) the add goes too: one shift brings 2 (4-bit) or 4 (2-bit) fields of a word to
bit positions 15-22, the magic float is 2^23 + q * 2^pos, and the 2^23 * sum(x * 2^-pos) it carries is
taken off once per group from a sum shared by the R rows. At positions >= 15 the magic is at most 2^8
times a nonzero field's share, so about 8 of float32's 24 bits go to it: the group sums keep ~16 bits
(NumPy port: ~1e-5 of the output's scale), far past the bf16/fp16 output's 8-11. SASS of the main loop
per unit, one row, R=8 (local nvcc 13, sm_90): 4-bit 1310 -> 943 instructions for 256 weights, 2-bit
2419 -> 1570 for 512, 8-bit 741 -> 614 for 128 (the one-LOP3 step only); measured in
bench/results/kernels-gemv-nosub-h100.json.

Scale and bias loads (2/4/8 bits): ptxas sank them below a unit's arithmetic to their first use (after ~790 of the
943 instructions of a 4-bit unit), a second memory round trip per unit; one LOP3 that ties them to the first weight
word (jang::tie, a no-op at run time) keeps them beside the weight loads, and __launch_bounds__(128, 4) keeps the
longer-lived registers within 128. A scale and its bias travel as raw bits in one register until the group's end.
"""

from __future__ import annotations

import math

import mlx.core as mx

from . import backend
from .cuda_common import HEADER, launch_bounds
from .qgemv_source import SOURCE  # re-exported: the fused variants and the benches read it


def fused_variant(epi: int, norm: bool, eps: float, rope: tuple[int, ...] | None) -> tuple[str, list[str]]:
    """The header defines and input names of a fused variant of SOURCE (also used by the Metal twin):
    epi 0 plain / 1 residual / 2 SwiGLU / 3 RoPE with rope = (head_dim, rotated heads[, q heads]); with the
    q head count the k and v rows are also stored into KV pools (kpool, vpool at blocks kvb, offsets kvo)."""
    defines = f"#define JANG_EPI {epi}\n#define JANG_NORM {int(norm)}\n"
    if norm:
        defines += f"#define JANG_EPS {float(eps)!r}f\n"
    if rope:
        defines += f"#define JANG_HD {rope[0]}\n#define JANG_NROT {rope[1]}\n"
    kvw = bool(rope) and len(rope) > 2
    if kvw:
        defines += f"#define JANG_KVW {rope[2]}\n"
    names = ["x", "w", "scales", "biases"] + (["nw"] if norm else []) + (["res"] if epi == 1 else []) + \
        (["rpos", "rfreq"] if epi == 3 else []) + (["kpool", "vpool", "kvb", "kvo"] if kvw else [])
    return defines, names


MAX_ROWS = 8          # the kernel serves 1..8 activation rows (qmm.py routes only 1..GEMV_ROWS here)


def rows_bucket(m: int) -> int:
    """Rows are compiled in buckets 1, 2, 4, 8 (fewer kernels to JIT; unused rows are skipped)."""
    return 1 if m <= 1 else 2 if m <= 2 else 4 if m <= 4 else 8
THREADS = 128
# 2/4/8 bits build with __launch_bounds__(128, 4) (128 registers with the early scale loads); GPU time 1.01-1.32x
# (bench/results/kernels-gemv-bounds-h100.json). 3/5/6 bits keep the plain build: with both, 2-6% slower.
MIN_BLOCKS = 4
GEMV_HEADER = HEADER + launch_bounds(THREADS, MIN_BLOCKS)
BOUNDED_BITS = (2, 4, 8)

_kernels: dict = {}
_override = None          # bench/kernels_gemv_sweep.py puts another build of the kernel here for an A/B


def header(bits: int) -> str:
    return GEMV_HEADER if bits in BOUNDED_BITS else HEADER


def kernel(bits: int):
    if _override is not None:
        return _override
    bounded = bits in BOUNDED_BITS
    if bounded not in _kernels:
        _kernels[bounded] = backend.cuda_kernel(
            name="jang_qgemv" if bounded else "jang_qgemv_u",
            input_names=["x", "w", "scales", "biases"],
            output_names=["y"],
            source=SOURCE,
            header=header(bits),
        )
    return _kernels[bounded]


def default_config(m: int, n: int, k: int, bits: int) -> dict:
    """R rows per team and W warps per team, from the H100 sweep (bench/results/kernels-h100.json):
    8 rows per team at one row of activations (4 at two, 2 at four), one warp per row team for
    wide outputs (N >= 8192) and two for narrow ones, where K is long."""
    mm = rows_bucket(m)
    r = 8 if mm == 1 else 4 if mm == 2 else 2
    w = 1 if n >= 8192 else 2
    if bits == 8 and mm == 1 and n < 8192:
        w = 4   # 8-bit q/k/v (fused) and o at one row: 15.0 / 13.7 us vs 16.5 / 16.4 (kernels-gemv-sweep-h100.json)
    return {"R": r, "W": w, "FAST": True, "PF": False}


def supports(x: mx.array, w: mx.array, bits: int, group_size: int) -> bool:
    k = x.shape[-1]
    return (
        x.dtype in (mx.bfloat16, mx.float16)   # load8 reads 8 16-bit values per 16 bytes
        and bits in (2, 3, 4, 5, 6, 8)
        and group_size in (32, 64, 128)
        and k % 128 == 0
        and w.dtype == mx.uint32
        and w.shape[-1] * 32 == k * bits
    )


def qgemv(x2d: mx.array, w: mx.array, scales: mx.array, biases: mx.array, bits: int,
          group_size: int, R: int | None = None, W: int | None = None, FAST: bool | None = None,
          PF: bool | None = None) -> mx.array:
    """x2d: [M<=8, K]; returns [M, N] in x's dtype."""
    m, k = x2d.shape
    n = w.shape[0]
    cfg = default_config(m, n, k, bits)
    R = cfg["R"] if R is None else R
    W = cfg["W"] if W is None else W
    FAST = cfg["FAST"] if FAST is None else FAST
    PF = cfg["PF"] if PF is None else PF
    teams = 4 // W
    blocks = math.ceil(n / (R * teams))
    return kernel(bits)(
        inputs=[x2d, w, scales, biases],
        template=[("T", x2d.dtype), ("S", scales.dtype), ("BITS", bits), ("GS", group_size),
                  ("MM", rows_bucket(m)), ("R", R), ("W", W), ("FAST", bool(FAST)), ("PF", bool(PF))],
        grid=(blocks * THREADS, 1, 1),
        threadgroup=(THREADS, 1, 1),
        output_shapes=[(m, n)],
        output_dtypes=[x2d.dtype],
    )[0]


def plan(m: int, n: int, k: int, dtype, bits: int, group_size: int):
    """A callable f(x2d, w, scales, biases) -> y with the launch arguments of this shape computed once."""
    cfg = default_config(m, n, k, bits)
    blocks = math.ceil(n / (cfg["R"] * (4 // cfg["W"])))
    kern, grid, tg, shp, odt = kernel(bits), (blocks * THREADS, 1, 1), (THREADS, 1, 1), [(m, n)], [dtype]
    fixed = [("BITS", bits), ("GS", group_size), ("MM", rows_bucket(m)), ("R", cfg["R"]), ("W", cfg["W"]),
             ("FAST", bool(cfg["FAST"])), ("PF", bool(cfg["PF"]))]
    return lambda x2d, w, sc, bi: kern(inputs=[x2d, w, sc, bi], template=[("T", dtype), ("S", sc.dtype)] + fixed,
                                       grid=grid, threadgroup=tg, output_shapes=shp, output_dtypes=odt)[0]
