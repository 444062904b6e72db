"""Tensor-core GEMV for 1-8 activation rows ("swap AB"): MLX's affine packed weights on CUDA.

y[M, N] = x[M, K] @ dequant(w)[N, K].T, w uint32 [N, K*bits/32] at 2, 4 or 8 bits, scales / biases
[N, K/GS], GS 32/64/128 (not 2 bits at 32), x bf16 or fp16, M <= 8.

mma.sync m16n8k16 with the WEIGHTS as operand A (a warp tile = 16 weight rows) and x as operand B
(its 8 columns are up to 8 rows of x; at M=1 only column 0 is real). Lane l = (g = l/4, t = l%4)
holds A rows g and g+8 and feeds the mma slots 2t, 2t+1, 2t+8, 2t+9; the K order inside the mma is
free as long as A and B agree, so per quantization group lane t takes its own contiguous slice of
GS/4 values of the group (the quad covers exactly one group per mma), and B lanes with the same t
load x at the same K values (pairs made by byte_perm).
- Weights to operand: one shift + one mask-or per pair, no subtraction: ((w >> b*i) & mask) | magic is
  the bf16x2 pair (128 + q_i, 128 + q_{i+H}) (fp16: 1024 + q). 8 bits go as two 4-bit planes (low and
  high nibble, two mmas, the high plane's sums times 16).
- Per group the fresh mma sums C = sum x*(magic + q) are folded in fp32:
  acc += scale * C + (bias - magic' * scale) * sum_x, sum_x from one more mma with A = all ones
  (shared by the warp's tiles); magic' = magic (17 * magic at 8 bits).
- A warp owns TT tiles (16*TT rows) and every NWARP-th chunk of U groups; the NWARP warps of a block
  split K and add their sums in shared memory; one block per 16*TT rows.
- Epilogues of the fused decode GEMVs (kernels/qmm_fused.py), same defines as kernels/qmm_cuda.py:
  JANG_NORM (x * nw in the B values, sum x^2 from an mma of x with itself, 1/rms on the final sums),
  JANG_EPI 1 residual, 2 SwiGLU (a tile's rows g are gate rows, rows g+8 the matching up rows),
  3 RoPE (rows g / g+8 = h*hd + j / h*hd + j + hd/2, rotated in-lane).
"""

from __future__ import annotations

import logging
import math
import os

import mlx.core as mx

from . import backend
from .backend import relerr
from .cuda_common import launch_smem
from .qgemv_tc_source import HEADER, SOURCE

MAX_ROWS = 8
# Stages of the cp.async ring through which a warp's loads run (the PIPE template; 0: straight into registers);
# JANG_GEMV_TC_PIPE overrides the default.
# 4 stages: faster than loads straight into registers at 1-8 rows on the H100 (8 rows, 14336x4096 4-bit:
# 29.0 vs 38.3 us; bench/results/kernels-gemv-pipe-h100.json), and than 6 stages at most shapes.
PIPE = int(os.environ.get("JANG_GEMV_TC_PIPE", "4"))


def supports(x2d: mx.array, w: mx.array, bits: int, group_size: int) -> bool:
    """Cases the kernel serves: x bf16/fp16 with at most 8 rows, 2/4/8 bits, group 32/64/128 (not 2 bits
    at group 32: a lane's share of a group would be half a word), whole groups."""
    k = x2d.shape[-1]
    m = math.prod(x2d.shape[:-1])
    return (x2d.dtype in (mx.bfloat16, mx.float16) and 1 <= m <= MAX_ROWS
            and bits in (2, 4, 8) and group_size in (32, 64, 128) and not (bits == 2 and group_size == 32)
            and w.dtype == mx.uint32 and w.ndim == 2 and k % group_size == 0 and w.shape[-1] * 32 == k * bits)


def rows_bucket(m: int) -> int:
    return 1 if m <= 1 else 2 if m <= 2 else 4 if m <= 4 else 8


def tiles(n: int, paired: bool) -> int:
    """16-row tiles: 16 consecutive rows, or 8 row pairs (gate/up, RoPE) of n rows."""
    return -(-(n // 2) // 8) if paired else -(-n // 16)


def config(m: int, n: int, k: int, bits: int, group_size: int, paired: bool = False) -> dict:
    """TT tiles per warp, NWARP warps per block (splitting K), U groups per load step (n, paired: kept for
    launch shapes that depend on the tile count)."""
    wl = group_size * bits // 128                   # words per lane, row and group
    u = max(1, 4 // wl)                             # ~16 bytes per lane and row in flight per step
    ngr = k // group_size
    while ngr % u:
        u //= 2
    # H100 (kernels-gemv-tc-h100.json, GPU time at one row): TT=2 was slower (23.4 vs 21.9 us at 14336x4096,
    # 46.4 vs 25.5 at 4096x14336: 104 registers, half the blocks), so one tile per warp everywhere; 8 warps
    # per block along long K (fewer, longer blocks otherwise).
    return {"TT": 1, "NWARP": 8 if k >= 8192 else 4, "U": u, "PIPE": PIPE}


def _fused_names(epi: int, norm: bool) -> list[str]:
    return ["x", "w", "scales", "biases"] + (["nw"] if norm else []) + (["res"] if epi == 1 else []) + \
        (["rpos", "rfreq"] if epi == 3 else [])


_kernels: dict = {}


def kernel(epi: int = 0, norm: bool = False, eps: float = 1e-5, rope: tuple[int, int] | None = None, smem: int = 0):
    """The kernel of one epilogue variant (epi 0 plain / 1 residual / 2 SwiGLU / 3 RoPE with
    rope = (head_dim, rotated heads)) and dynamic shared memory size (the pipelined loads); compiled by MLX
    per template."""
    key = (epi, norm, float(eps) if norm else None, rope, smem)
    k = _kernels.get(key)
    if k is None:
        defines = f"#define JANG_EPI {epi}\n#define JANG_NORM {int(norm)}\n"
        if norm:
            defines += f"#define JANG_EPS {float(eps)!r}f\n"
        if rope:
            defines += f"#define JANG_HD {rope[0]}\n#define JANG_NROT {rope[1]}\n"
        k = _kernels[key] = backend.cuda_kernel(name=f"jang_qgemv_tc_{len(_kernels)}",
                                                input_names=_fused_names(epi, norm), output_names=["y"],
                                                source=SOURCE, header=defines + HEADER, shared_memory=smem)
    return k


def pipe_shape(m: int, k: int, bits: int, group_size: int, u: int, ssize: int, tsize: int = 2, norm: bool = False):
    """(U, bytes of one stage) of the pipelined loads, or None where they do not apply: a stage copies U
    groups' scales of a row in one cp.async of 4, 8 or 16 bytes, and a row's group in 16-byte pieces."""
    u = max(u, 4 // ssize)
    ngr = k // group_size
    if ngr % u or u * ssize > 16 or (group_size * bits // 8) % 16:
        return None
    return u, (u * 16 * group_size * bits // 8 + rows_bucket(m) * u * group_size * tsize + 2 * 16 * u * ssize
               + (u * group_size * tsize if norm else 0))


def launch(m, n, k, dtype, bits, group_size, epi=0, norm=False, eps=1e-5, rope=None, TT=None, NWARP=None, U=None,
           PIPE=None):
    """A callable f(inputs: list, sdtype) -> y with this shape's launch arguments computed once (per scale
    dtype)."""
    paired = epi in (2, 3)
    cfg = config(m, n, k, bits, group_size, paired)
    tt, nwarp, u = TT or cfg["TT"], NWARP or cfg["NWARP"], U or cfg["U"]
    pipe = cfg["PIPE"] if PIPE is None else PIPE
    if (k // group_size) % u:
        raise ValueError(f"qgemv_tc: U={u} does not divide the {k // group_size} groups")
    blocks = -(-tiles(n, paired) // tt)
    grid, tg = (blocks * 32 * nwarp, 1, 1), (32 * nwarp, 1, 1)
    n_out = n // 2 if epi == 2 else n
    shp, odt = [(m, n_out)], [dtype]
    per_sdtype: dict = {}

    def prepared(sdtype):
        uu, smem, pp = u, 0, 0
        ps = pipe_shape(m, k, bits, group_size, u, sdtype.size, dtype.size, norm) if pipe and tt == 1 else None
        if ps is not None:
            uu, pp = ps[0], pipe
            smem = launch_smem(nwarp * pipe * ps[1])
        fixed = [("T", dtype), ("S", sdtype), ("BITS", bits), ("GS", group_size), ("MM", rows_bucket(m)),
                 ("TT", tt), ("NWARP", nwarp), ("U", uu), ("PIPE", pp)]
        return kernel(epi, norm, eps, rope, smem), fixed

    def f(inputs, sdtype):
        p = per_sdtype.get(sdtype)
        if p is None:
            p = per_sdtype[sdtype] = prepared(sdtype)
        return p[0](inputs=inputs, template=p[1], grid=grid, threadgroup=tg, output_shapes=shp,
                    output_dtypes=odt)[0]
    return f


def qgemv_tc(x2d, w, scales, biases, bits, group_size, norm_weight=None, eps=1e-5, residual=None, swiglu=False,
             rope=None, **cfg):
    """x2d [M<=8, K] -> [M, N] (N/2 with swiglu) in x's dtype. rope = (positions int32 [M], inv_freq
    float32 [hd/2], head_dim, rotated heads) for the RoPE epilogue. cfg: TT, NWARP, U overrides."""
    m, k = x2d.shape
    n = w.shape[0]
    epi = 3 if rope is not None else 2 if swiglu else 1 if residual is not None else 0
    norm = norm_weight is not None
    f = launch(m, n, k, x2d.dtype, bits, group_size, epi, norm, eps, (rope[2], rope[3]) if rope else None, **cfg)
    inputs = [x2d, w, scales, biases] + ([norm_weight] if norm else []) + ([residual] if epi == 1 else []) + \
        ([rope[0], rope[1]] if rope else [])
    return f(inputs, scales.dtype)


def plan(m: int, n: int, k: int, dtype, bits: int, group_size: int):
    """The plain GEMV as kernels.qmm caches it: f(x2d, w, scales, biases) -> y."""
    f = launch(m, n, k, dtype, bits, group_size)
    return lambda x2d, w, sc, bi: f([x2d, w, sc, bi], sc.dtype)


_checked: dict = {}


def ready(dtype, sdtype, bits: int, group_size: int, m: int, n: int | None = None, k: int | None = None,
          fused: bool = False) -> bool:
    """First use of a template (dtype, scale dtype, bits, group, row bucket, and the launch shape that
    config() picks for an [n, k] weight): run it on a small random case against the dequantized float32
    matmul (fused: the norm + SwiGLU variant too); a mismatch or a compile error turns the tensor-core path
    off for that template (logged), and the caller's other path serves."""
    cfg = {} if n is None else config(m, n, k, bits, group_size)
    key = (dtype, sdtype, bits, group_size, rows_bucket(m), tuple(sorted(cfg.items())), fused)
    if key not in _checked:
        ok, why = True, ""
        try:
            nt, kt = 272, 1024
            cfg = {c: v for c, v in cfg.items() if c != "U" or (kt // group_size) % v == 0}
            wf = mx.random.normal((nt, kt)).astype(dtype) * 0.05
            wq, s, b = mx.quantize(wf, group_size=group_size, bits=bits)
            s, b = s.astype(sdtype), b.astype(sdtype)
            x = mx.random.normal((rows_bucket(m), kt)).astype(dtype)
            wd = mx.dequantize(wq, s.astype(mx.float32), b.astype(mx.float32), group_size=group_size, bits=bits)
            cases = [("plain", lambda: qgemv_tc(x, wq, s, b, bits, group_size, **cfg), x.astype(mx.float32) @ wd.T)]
            if fused:
                nw = (mx.random.normal((kt,)) * 0.2 + 1).astype(dtype)
                gu = mx.fast.rms_norm(x.astype(mx.float32), nw.astype(mx.float32), 1e-5) @ wd.T
                g, u = gu[:, : nt // 2], gu[:, nt // 2:]
                cases.append(("norm+swiglu", lambda: qgemv_tc(x, wq, s, b, bits, group_size, norm_weight=nw,
                                                              swiglu=True), g * mx.sigmoid(g) * u))
            for name, run, r in cases:
                err = relerr(run(), r)
                if not err < 2e-2:
                    ok, why = False, f"{name}: relative error {err:.3g}"
                    break
        except Exception as e:  # a compile or launch error: keep serving through the other path
            ok, why = False, f"{type(e).__name__}: {e}"
        if not ok:
            logging.getLogger("jang_serve.kernels").warning(
                "kernels: cuda tensor-core qgemv %s disabled (%s)", key, why)
        _checked[key] = ok
    return _checked[key]
