"""Warpgroup (wgmma) GEMM for MLX's affine packed weights on Hopper (sm_90a): kernels.qmm's route for 96-256 rows.

y[M, N] = x[M, K] @ dequant(w)[N, K].T, w uint32 [N, K*bits/32] (bits 2, 4 or 8), scales / biases
[N, K/group_size] in x's dtype (bf16 or fp16); MLX's layout as stored.

Why: at 128-256 rows the mma.sync GEMMs (qgemm3) stay at 0.46-0.86x the bf16 matmul, which cuBLAS runs
with Hopper's asynchronous warpgroup MMA. `mx.fast.cuda_kernel` compiles for sm_90, where wgmma does not
exist, so this kernel is compiled for sm_90a with NVRTC (kernels/nvrtc.py) and launched through
`mx.fast.precompiled_cuda_kernel`.

- **Block** = WGS warpgroups (default 2: 256 threads), each owning MT m64 tiles of x rows (MT = 1 up to 128
  rows, 2 above: the weight tile is dequantized once per 64*WGS*MT rows) by BN = 128 (or 256) output
  features; one K slice (split-K over grid z when too few tiles fill the GPU; fp32 partials summed by
  qgemm_cuda's reduce kernel). Grid x runs over the row tiles, so the blocks that share a weight tile run
  together and the later ones read it from L2.
- **Operands**: both from shared memory (descriptors), K-major, 128-byte swizzle: a tile row's 64 values
  are 128 bytes whose 16-byte chunks are XOR-permuted by the row's index within its 8-row, 1024-byte
  atom (the unswizzled core-matrix layout measured 1.2-1.8x slower, bank conflicts; commit 0846a62). x is
  A (m64), the dequantized weight tile is B (n = BN): `wgmma.mma_async.m64n{BN}k16`, fp32 accumulators in
  registers (MT*BN/2 per thread).
- **Warp-specialized** (WS, the default for 256-row blocks; kernels/qgemm_wg_ws_source.py): one or two
  producer warpgroups load and dequantize into a STAGES-deep ring of slots, the two consumer warpgroups only
  issue wgmmas; FULL / EMPTY named barriers per slot; with two producers setmaxnreg moves registers to the
  consumers (80 / 176).
- **Pipeline** (the non-specialized kernel): K in stages of 64 through a STAGES-slot cp.async ring (x tile +
  the packed weight rows), STAGES-2 stages ahead; each stage the 256 threads dequantize the packed tile into
  one of two bf16 / fp16 tiles (a 32-value unit per thread and 128 features: its row's 16-byte chunks), fence the
  writes to the async proxy, barrier, and the warpgroups issue 4 wgmmas (one per k16) and keep one stage
  of them in flight (wait_group 1), so a stage's dequant overlaps the previous stage's MMAs.
- **Dequant** of a 32-bit word: pairs of fields (i, i + 4) at 4 bits ((i, i + 8) at 2 bits) go under the
  magic exponent with one mask-or each (128 + q in bf16, 1024 + q in fp16), one packed sub removes the
  magic (exact), one packed fma applies scale and bias (one rounding, as the reference), and byte
  permutes restore the K order. 8 bits in bf16 go through fp32 (128 + q does not fit bf16).
"""

from __future__ import annotations

import os

import mlx.core as mx

from . import backend, nvrtc, qgemm_cuda
from .qgemm_wg_source import kernel_name, source

BK = 64
TARGET_BLOCKS = 132
SMEM_MAX = 227 * 1024


def supports_shape(n: int, k: int, dtype, sdtype, bits: int, group_size: int) -> bool:
    """2/4/8 bits, groups 32/64/128, bf16/fp16 activations with scales of the same dtype (or unknown: None),
    K a multiple of 64, N a multiple of 128."""
    return (dtype in (mx.bfloat16, mx.float16) and bits in (2, 4, 8) and group_size in (32, 64, 128)
            and (sdtype is None or sdtype == dtype) and k % BK == 0 and n % 128 == 0)


def supports(x: mx.array, w: mx.array, bits: int, group_size: int, scales_dtype=None) -> bool:
    k = x.shape[-1]
    return (w.dtype == mx.uint32 and w.shape[-1] * 32 == k * bits
            and supports_shape(w.shape[0], k, x.dtype, scales_dtype, bits, group_size))


def smem_bytes(bits: int, bn: int, stages: int, wgs: int, mt: int = 1, ws: int = 0) -> int:
    """Dynamic shared memory (mirrors STB / WBB, or WSLOT of the warp-specialized kernel)."""
    ring = stages * (64 * wgs * mt * BK * 2 + bn * BK * bits // 8)
    return ring + (stages if ws else 2) * bn * BK * 2


def config_args(overrides: dict) -> dict:
    """qgemm()'s overrides (BN, WGS, MT, WS, stages, split, ...) as config() keywords."""
    return {a.lower() if a in ("BN", "WGS", "MT", "WS") else a: v for a, v in overrides.items()}


def config(m: int, n: int, k: int, bits: int, bn: int | None = None, stages: int | None = None,
           split: int | None = None, target: int | None = None, wgs: int | None = None, mt: int | None = None,
           probe: int = 0, ws: int | None = None) -> dict:
    # Defaults from bench/results/qgemm-wg-h100.json: two warpgroups; one m64 tile each up to 128 rows, two
    # above (the weight tile is dequantized once per 256 rows); 128 features; 4 stages.
    wgs = wgs or int(os.environ.get("JANG_QGEMM_WG_WGS", 0)) or 2
    bn = bn or int(os.environ.get("JANG_QGEMM_WG_BN", 0)) or 128
    mt = mt or int(os.environ.get("JANG_QGEMM_WG_MT", 0)) or (1 if m <= 64 * wgs or bn > 128 else 2)
    bm = 64 * wgs * mt
    if n % bn:
        raise ValueError(f"qgemm_wg: N={n} is not a multiple of {bn}")
    if mt * bn > 256:
        raise ValueError(f"qgemm_wg: {mt} m64 tiles of {bn} features take more than 128 accumulators per thread")
    st = stages or int(os.environ.get("JANG_QGEMM_WG_STAGES", 4))
    # producer warpgroups of the warp-specialized kernel (0: every warp loads, dequantizes and multiplies): two
    # where a block has 256 rows (1.04-1.14x at 256 rows, 4 bits; slower at 128 rows: qgemm-wg-h100.json)
    env_ws = os.environ.get("JANG_QGEMM_WG_WS")
    ws = (int(env_ws) if env_ws else 2 if mt == 2 and bn == 128 else 0) if ws is None else int(ws)
    if ws == 2 and bn > 128:   # ptxas: an m64n256 wgmma does not fit the 128-register launch target of 512 threads
        raise ValueError("qgemm_wg: two producer warpgroups take 128 features per block")
    if st < 3 or smem_bytes(bits, bn, st, wgs, mt, ws) > SMEM_MAX or (ws and 2 * st + 1 >= 16):
        raise ValueError(f"qgemm_wg: {st} stages do not fit")
    tgt = target or TARGET_BLOCKS
    if split is None:
        blocks, split = -(-m // bm) * (n // bn), 1
        while blocks * split * 2 <= tgt and k % (BK * split * 2) == 0 and k // (split * 2) >= 4 * BK:
            split *= 2
    if k % (BK * split):
        raise ValueError(f"qgemm_wg: K={k} does not split into {split} parts of whole {BK}-wide stages")
    return dict(BN=bn, stages=st, split=split, WGS=wgs, MT=mt, probe=probe, ws=ws)


_cubins: dict[tuple, bytes] = {}


def cubin(bits: int, group_size: int, bf16: bool, bn: int, stages: int, split: bool, wgs: int, mt: int = 1,
          probe: int = 0, ws: int = 0) -> tuple[str, bytes]:
    key = (bits, group_size, bf16, bn, stages, split, wgs, mt, probe, ws)
    name = kernel_name(*key)
    if key not in _cubins:
        _cubins[key] = nvrtc.compile_cubin(source(*key), name)
    return name, _cubins[key]


def launcher(name: str, code: bytes, grid: tuple, nth: int, smem: int, m: int, n: int, split: int, dtype,
             partials: bool = False):
    """f(x2d, w, scales, biases) -> y [m, n] for a precompiled GEMM cubin taking (x, w, scales, biases, out, M, N,
    K); with split > 1 the kernel writes fp32 partials [split, m, n] that qgemm_cuda's reduce kernel sums. Shared
    by the two warpgroup GEMMs (this one and kernels/qgemm_rs_cuda.py). partials=True (a cubin built with its
    split flag): f returns those partials [split, m, n] themselves, for an epilogue kernel to sum
    (kernels/gemm_epilogue.py)."""
    def run(x2d, w, sc, bi, shapes, dtypes):
        return mx.fast.precompiled_cuda_kernel(
            name=name, compiled_source=code, inputs=[x2d, w, sc, bi], output_shapes=shapes, output_dtypes=dtypes,
            scalars=[m, n, x2d.shape[1]], grid=grid, threadgroup=(nth, 1, 1), shared_memory=smem,
            ensure_row_contiguous=True)[0]

    shp = [(m, n)]
    if partials:
        return lambda x2d, w, sc, bi: run(x2d, w, sc, bi, [(split, m, n)], [mx.float32])
    if split == 1:
        return lambda x2d, w, sc, bi: run(x2d, w, sc, bi, shp, [dtype])
    red, wshp, odt = qgemm_cuda.reduce_kernel(), [(split, m, n)], [dtype]
    rgrid, rtmpl = (-(-(m * n // 4) // 256) * 256, 1, 1), [("T", dtype)]

    def f(x2d, w, sc, bi):
        ws = run(x2d, w, sc, bi, wshp, [mx.float32])
        return red(inputs=[ws], template=rtmpl, grid=rgrid, threadgroup=(256, 1, 1), output_shapes=shp,
                   output_dtypes=odt)[0]
    return f


def _launch(cfg, m, n, dtype, bits, group_size, partials: bool = False):
    bn, st, s, wgs, mt = cfg["BN"], cfg["stages"], cfg["split"], cfg["WGS"], cfg["MT"]
    ws = cfg["ws"]
    name, code = cubin(bits, group_size, dtype == mx.bfloat16, bn, st, s > 1 or partials, wgs, mt, cfg["probe"], ws)
    nth = 128 * (wgs + ws)
    grid = (-(-m // (64 * wgs * mt)) * nth, n // bn, s)
    return launcher(name, code, grid, nth, smem_bytes(bits, bn, st, wgs, mt, ws), m, n, s, dtype, partials)


def qgemm(x2d: mx.array, w: mx.array, scales: mx.array, biases: mx.array, bits: int, group_size: int,
          **overrides) -> mx.array:
    """x2d [M, K] bf16/fp16 -> [M, N] in x's dtype. overrides: BN, stages, split, target (config)."""
    m, k = x2d.shape
    cfg = config(m, w.shape[0], k, bits, **config_args(overrides))
    return _launch(cfg, m, w.shape[0], x2d.dtype, bits, group_size)(x2d, w, scales, biases)


def plan(m: int, n: int, k: int, dtype, bits: int, group_size: int):
    """A callable f(x2d, w, scales, biases) -> y with every launch argument computed once (compiles the
    template's cubin if it is not cached yet: start-up warm-up calls this for the model's shapes)."""
    return _launch(config(m, n, k, bits), m, n, dtype, bits, group_size)


def plan_partials(m: int, n: int, k: int, dtype, bits: int, group_size: int):
    """f(x2d, w, scales, biases) -> fp32 partial sums [split, m, n] of plan's configuration (split may be 1)."""
    return _launch(config(m, n, k, bits), m, n, dtype, bits, group_size, partials=True)


_checked: dict[tuple, bool] = {}


def check_gemm(qgemm_fn, dtype, bits: int, group_size: int, cases) -> tuple[bool, str]:
    """qgemm_fn(x, w, scales, biases, bits, group_size, split=s) at each (rows, split) of cases against the
    dequantized float32 matmul (512 x 1024 weights). Shared by the GEMMs' self-tests."""
    from .backend import relerr

    n, k = 512, 1024
    wf = mx.random.normal((n, k)).astype(dtype) * 0.05
    wq, s, b = mx.quantize(wf, group_size=group_size, bits=bits)
    s, b = s.astype(dtype), b.astype(dtype)
    wd = mx.dequantize(wq, s.astype(mx.float32), b.astype(mx.float32), group_size=group_size, bits=bits)
    for m, split in cases:
        x = mx.random.normal((m, k)).astype(dtype)
        ref = x.astype(mx.float32) @ wd.T   # no quantized_matmul: that would JIT MLX's fp32 kernels
        err = relerr(qgemm_fn(x, wq, s, b, bits, group_size, split=split), ref)
        if not err < 2e-2:
            return False, f"relative error {err:.3g} at {m} rows, split={split}"
    return True, ""


def self_test(dtype, bits: int, group_size: int) -> tuple[bool, str]:
    """Both tile widths, split and not, a partial row tile, against the dequantized float32 matmul."""
    return check_gemm(qgemm, dtype, bits, group_size, ((136, 1), (300, 2), (128, 1), (72, 4)))


def ready_checked(name: str, checked: dict, test, dtype, sdtype, bits: int, group_size: int) -> bool:
    """First use of a template (dtype, bits, group): compile (NVRTC) and test(dtype, bits, group); a failure
    (no NVRTC, not a Hopper GPU, a mismatch) turns it off, logged, and the route falls back."""
    if sdtype != dtype:
        return False
    return backend.verdict(checked, (dtype, bits, group_size), lambda: test(dtype, bits, group_size), name)


def ready(dtype, sdtype, bits: int, group_size: int) -> bool:
    """ready_checked for this kernel (the self-test above)."""
    return ready_checked("qgemm_wg", _checked, self_test, dtype, sdtype, bits, group_size)
