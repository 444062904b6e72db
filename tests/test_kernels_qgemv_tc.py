"""The tensor-core GEMV (kernels/qgemv_tc_cuda.py) on the CPU: a lane-level NumPy emulation of its CUDA
source -- per-lane pointers and word offsets, the shift / mask-or into (magic + q) bf16/fp16 pairs, the
byte_perm selectors that pair x values, the m16n8k16 A / B / C fragment layouts (PTX ISA), the ones-mma
for sum(x), the x x^T mma whose diagonal is sum(x^2), the per-group fold, the cross-warp sum and the
epilogues -- against mx.quantized_matmul (and the fused compositions); mutations of the mapping must
fail it. Plus the launch configuration and the routing choices (no GPU needed)."""

import importlib

import mlx.core as mx
import numpy as np
import pytest

from jang_serve.kernels import qgemv_tc_cuda as tc
from lane_helpers import bperm as _bperm

qmm_mod = importlib.import_module("jang_serve.kernels.qmm")


# ------------------------------------------------------------------------------------------ helpers
def _halves(r, half):
    """A packed pair of 16-bit floats (uint32) -> (lo, hi) float64; half: "bf16" or "f16"."""
    lo, hi = r & np.uint32(0xFFFF), r >> np.uint32(16)
    if half == "bf16":
        f = lambda h: (h.astype(np.uint32) << np.uint32(16)).view(np.float32).astype(np.float64)
    else:
        f = lambda h: h.astype(np.uint16).view(np.float16).astype(np.float64)
    return f(lo), f(hi)


def _to_half_bits(v, half):
    v = np.asarray(v, dtype=np.float32)
    if half == "f16":
        return v.astype(np.float16).view(np.uint16).astype(np.uint32)
    u = v.view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint32)


def _mul2(a, b, half):
    """__hmul2: each half multiplied, rounded once to the 16-bit type."""
    (al, ah), (bl, bh) = _halves(a, half), _halves(b, half)
    return _to_half_bits(al * bl, half) | (_to_half_bits(ah * bh, half) << np.uint32(16))


LANE = np.arange(32)
G, T = LANE >> 2, LANE & 3


def mma(d, a, b0, b1, half):
    """mma.sync m16n8k16 (row.col, fp32 accumulate): per-lane fragments -> d[4][32] += A @ B."""
    A = np.zeros((16, 16))
    B = np.zeros((16, 8))
    for reg, (dr, dk) in zip(a, ((0, 0), (8, 0), (0, 8), (8, 8))):
        lo, hi = _halves(reg, half)
        A[G + dr, 2 * T + dk], A[G + dr, 2 * T + 1 + dk] = lo, hi
    for reg, dk in ((b0, 0), (b1, 8)):
        lo, hi = _halves(reg, half)
        B[2 * T + dk, G], B[2 * T + 1 + dk, G] = lo, hi
    D = A @ B
    d[0] += D[G, 2 * T]
    d[1] += D[G, 2 * T + 1]
    d[2] += D[G + 8, 2 * T]
    d[3] += D[G + 8, 2 * T + 1]


def emulate(x16, w, s, b, bits, gs, half="bf16", TT=1, NWARP=4, U=1, epi=0, nw16=None, eps=1e-5, res=None,
            rope=None, mut=None):
    """The kernel, block by block and warp by warp, the 32 lanes as NumPy vectors.
    x16: uint16 bit patterns [M, K]; w uint32 [N, KW]; s, b float32 [N, K/gs] (as loaded);
    nw16 uint16 [K]; res float [M, N]; rope = (pos [M], inv_freq [hd/2], hd, nrot). mut: a mutation."""
    mut = mut or set()
    M, K = x16.shape
    N, KW = w.shape
    KL, VPW = gs // 4, 32 // bits
    WL, XL = KL * bits // 32, KL // 2
    SPW = 1 if bits == 8 else VPW // 4
    DX = 1 if bits == 8 else VPW // 4
    NP = 2 if bits == 8 else 1
    FB = 4 if bits == 8 else bits
    MASK2 = np.uint32(((1 << FB) - 1) * 0x00010001)
    MAGIC = np.uint32(0x43004300 if half == "bf16" else 0x64006400)
    ONE2 = np.uint32(0x3F803F80 if half == "bf16" else 0x3C003C00)
    OFF = (128.0 if half == "bf16" else 1024.0) * (17 if bits == 8 else 1)
    if "off" in mut:       # the magic's offset not removed (8 bits: the high plane's 16x share of it)
        OFF = (128.0 if half == "bf16" else 1024.0) if bits == 8 else 0.0
    NGR = K // gs
    wflat = w.reshape(-1)
    xw = (x16[:, 0::2].astype(np.uint32) | (x16[:, 1::2].astype(np.uint32) << np.uint32(16))).reshape(-1)  # words
    nww = None if nw16 is None else (nw16[0::2].astype(np.uint32) | (nw16[1::2].astype(np.uint32) << np.uint32(16)))
    paired = epi in (2, 3)
    NO = N // 2 if paired else N
    if epi == 3:
        pos, inv, hd, nrot = rope
        HH = hd // 2
    ntiles = tc.tiles(N, paired)
    blocks = -(-ntiles // TT)
    n_out = N // 2 if epi == 2 else N
    y = np.full((M, n_out), np.nan)
    for blk in range(blocks):
        # per-lane rows of each tile (clamped), as the kernel's pointer set-up
        rows = np.zeros((TT, 2, 32), dtype=np.int64)
        for a in range(TT):
            tile = blk * TT + a
            for r in range(2):
                if epi == 2:
                    n = np.minimum(tile * 8 + G, NO - 1) + r * NO
                elif epi == 3:
                    o = np.minimum(tile * 8 + G, NO - 1)
                    n = (o // HH) * hd + o % HH + r * HH
                else:
                    n = np.minimum(tile * 16 + G + 8 * r, N - 1)
                rows[a, r] = n
        xrow = np.minimum(G, M - 1)
        red = np.zeros((NWARP, TT, 4, 32))
        ssr = np.zeros((NWARP, 8))
        for warp in range(NWARP):
            acc = np.zeros((TT, 4, 32))
            ssd = np.zeros((4, 32))
            for ch in range(warp, NGR // U, NWARP):
                for u in range(U):
                    grp = ch * U + u
                    wq = [[[wflat[rows[a, r] * KW + T * WL + grp * (gs * bits // 32) + i] for i in range(WL)]
                           for r in range(2)] for a in range(TT)]
                    xbase = xrow * (K // 2) + (grp * gs + T * KL) // 2
                    xv = [xw[xbase + i] for i in range(XL)]
                    if nww is not None:
                        nv = [nww[(grp * gs + T * KL) // 2 + i] for i in range(XL)]
                        for i in range(0, XL, 2):
                            mma(ssd, (xv[i], xv[i], xv[i + 1], xv[i + 1]), xv[i], xv[i + 1], half)
                        xv = [_mul2(xv[i], nv[i], half) for i in range(XL)]
                    sx = np.zeros((4, 32))
                    d = np.zeros((TT, NP, 4, 32))
                    for i in range(WL):
                        for st in range(SPW):
                            xi = 2 * i if bits == 8 else i * (VPW // 2) + st
                            s0, s1 = (0x7632, 0x5410) if "bsel" in mut else (0x5410, 0x7632)
                            b0 = _bperm(xv[xi], xv[xi + DX], s0)
                            b1 = _bperm(xv[xi], xv[xi + DX], s1)
                            ones = np.full(32, ONE2, dtype=np.uint32)
                            mma(sx, (ones, ones, ones, ones), b0, b1, half)
                            for a in range(TT):
                                for p in range(NP):
                                    sh0 = 4 * p if bits == 8 else bits * 2 * st
                                    sh1 = 4 * p + 8 if bits == 8 else bits * (2 * st + 1)
                                    if "shift" in mut:
                                        sh0, sh1 = sh1, sh0
                                    w0, w1 = wq[a][0][i], wq[a][1][i]
                                    f = lambda v, sh: ((v >> np.uint32(sh)) & MASK2) | MAGIC
                                    regs = (f(w0, sh0), f(w1, sh0), f(w0, sh1), f(w1, sh1))
                                    if "rows" in mut:
                                        regs = (regs[1], regs[0], regs[2], regs[3])
                                    mma(d[a, p], regs, b0, b1, half)
                    for a in range(TT):
                        for r in range(2):
                            sg = (grp + 1) % NGR if "group" in mut else grp     # scales of another group
                            sc = s[rows[a, r], sg]
                            bb = b[rows[a, r], sg] - OFF * sc
                            for c in range(2):
                                v = acc[a, 2 * r + c] + bb * sx[c] + sc * d[a, 0, 2 * r + c]
                                if NP == 2:
                                    v = v + 16 * sc * d[a, 1, 2 * r + c]
                                acc[a, 2 * r + c] = v
            red[warp] = acc
            sel = T == (G >> 1)
            ssr[warp, G[sel]] = ssd[G[sel] & 1, np.nonzero(sel)[0]]
        for a in range(TT):
            v = red[:, a].sum(0)                      # [4, 32]
            tile = blk * TT + a
            for lane in range(32):
                gg, tt = lane >> 2, lane & 3
                for c in range(2):
                    m = 2 * tt + c
                    if m >= M:
                        continue
                    inv_rms = 1.0 if nww is None else 1.0 / np.sqrt(ssr[:, m].sum() / K + eps)
                    v0, v1 = v[c, lane] * inv_rms, v[2 + c, lane] * inv_rms
                    if epi == 2:
                        o = tile * 8 + gg
                        if o < NO:
                            y[m, o] = v0 / (1 + np.exp(-v0)) * v1
                    elif epi == 3:
                        o = tile * 8 + gg
                        if o < NO:
                            h, j = o // HH, o % HH
                            a0, a1 = v0, v1
                            if h < nrot:
                                ang = pos[m] * inv[j]
                                a0, a1 = v0 * np.cos(ang) - v1 * np.sin(ang), v0 * np.sin(ang) + v1 * np.cos(ang)
                            y[m, h * hd + j], y[m, h * hd + j + HH] = a0, a1
                    else:
                        for r in range(2):
                            n = tile * 16 + gg + 8 * r
                            if n < N:
                                y[m, n] = (v1 if r else v0) + (0 if res is None else res[m, n])
    return y


def _inputs(n, k, m, bits, gs, half, seed):
    mx.random.seed(seed)
    dt = mx.bfloat16 if half == "bf16" else mx.float16
    wq, s, b = mx.quantize((mx.random.normal((n, k)) * 0.05).astype(dt), group_size=gs, bits=bits)
    x = mx.random.normal((m, k)).astype(dt)
    u16 = np.array(x.view(mx.uint16))
    return x, wq, s, b, u16


def _ref(x, wq, s, b, bits, gs):
    return np.array(mx.quantized_matmul(x.astype(mx.float32), wq, s.astype(mx.float32), b.astype(mx.float32),
                                        transpose=True, group_size=gs, bits=bits), dtype=np.float64)


def _err(y, ref):
    assert np.isfinite(y).all()
    return np.linalg.norm(y - ref) / np.linalg.norm(ref)


# ------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("bits,gs,m,half,TT,NWARP,U", [
    (4, 64, 1, "bf16", 1, 4, 1), (4, 32, 3, "bf16", 2, 2, 2), (4, 128, 8, "f16", 1, 2, 1),
    (2, 64, 2, "bf16", 1, 2, 2), (2, 128, 1, "f16", 2, 1, 1),
    (8, 64, 1, "bf16", 1, 2, 1), (8, 32, 5, "f16", 1, 4, 2), (8, 128, 1, "bf16", 2, 1, 1),
])
def test_emulation_matches_quantized_matmul(bits, gs, m, half, TT, NWARP, U):
    n, k = 40, 512                                    # 40 rows: a partial last tile
    x, wq, s, b, x16 = _inputs(n, k, m, bits, gs, half, bits * 7 + gs + m)
    ref = _ref(x, wq, s, b, bits, gs)
    y = emulate(x16, np.array(wq), np.array(s.astype(mx.float32)), np.array(b.astype(mx.float32)), bits, gs, half,
                TT=TT, NWARP=NWARP, U=U)
    assert _err(y, ref) < 2e-5     # the mma sums (magic + q) exactly; only fp32 rounding differs


@pytest.mark.parametrize("mut", ["off", "group", "bsel", "shift", "rows"])
@pytest.mark.parametrize("bits", [4, 8])
def test_mutations_fail(mut, bits):
    gs, n, k, m = 64, 32, 256, 2
    x, wq, s, b, x16 = _inputs(n, k, m, bits, gs, "bf16", 5)
    ref = _ref(x, wq, s, b, bits, gs)
    args = (x16, np.array(wq), np.array(s.astype(mx.float32)), np.array(b.astype(mx.float32)), bits, gs)
    assert _err(emulate(*args), ref) < 2e-5
    assert _err(emulate(*args, mut={mut}), ref) > 1e-2


def test_norm_swiglu_residual_rope_epilogues():
    bits, gs, k, m = 4, 64, 256, 2
    x, wq, s, b, x16 = _inputs(64, k, m, bits, gs, "bf16", 11)
    nw = (mx.random.normal((k,)) * 0.2 + 1).astype(mx.bfloat16)
    nw16 = np.array(nw.view(mx.uint16))
    sf, bf = np.array(s.astype(mx.float32)), np.array(b.astype(mx.float32))
    wd = np.array(mx.dequantize(wq, s.astype(mx.float32), b.astype(mx.float32), group_size=gs, bits=bits),
                  dtype=np.float64)
    xf = np.array(x.astype(mx.float32), dtype=np.float64)
    h = xf / np.sqrt((xf ** 2).mean(-1, keepdims=True) + 1e-5) * np.array(nw.astype(mx.float32), dtype=np.float64)
    yy = h @ wd.T
    want = yy[:, :32] / (1 + np.exp(-yy[:, :32])) * yy[:, 32:]
    got = emulate(x16, np.array(wq), sf, bf, bits, gs, epi=2, nw16=nw16)
    assert got.shape == (m, 32) and _err(got, want) < 5e-3      # x * nw rounded to bf16 once
    # residual
    res = np.random.default_rng(0).normal(size=(m, 64))
    got = emulate(x16, np.array(wq), sf, bf, bits, gs, epi=1, res=res)
    assert _err(got, xf @ wd.T + res) < 2e-5
    # RoPE: 4 heads of 16 (3 rotated), pairs (j, j + 8) at angle pos * inv[j]
    hd, nrot = 16, 3
    pos = np.array([5, 40])
    inv = 10000.0 ** (-np.arange(0, hd, 2) / hd)
    got = emulate(x16, np.array(wq), sf, bf, bits, gs, epi=3, rope=(pos, inv, hd, nrot))
    yh = (xf @ wd.T).reshape(m, 4, hd)
    ang = pos[:, None, None] * inv[None, None, :]
    a, c = yh[..., :8], yh[..., 8:]
    rot = np.concatenate([a * np.cos(ang) - c * np.sin(ang), a * np.sin(ang) + c * np.cos(ang)], -1)
    want = np.concatenate([rot[:, :nrot], yh[:, nrot:]], 1).reshape(m, 64)
    assert _err(got, want) < 2e-5


def test_supports_and_config():
    x = mx.zeros((1, 4096), mx.bfloat16)
    for bits, gs, ok in ((4, 64, True), (8, 32, True), (2, 128, True), (2, 32, False), (3, 64, False),
                         (6, 64, False)):
        w = mx.zeros((64, 4096 * bits // 32), mx.uint32)
        assert tc.supports(x, w, bits, gs) == ok, (bits, gs)
    w = mx.zeros((64, 512), mx.uint32)
    assert not tc.supports(mx.zeros((9, 4096), mx.bfloat16), w, 4, 64)      # more than 8 rows
    assert not tc.supports(mx.zeros((1, 4096)), w, 4, 64)                    # float32 x
    for (m, n, k, bits, gs) in ((1, 14336, 4096, 4, 64), (1, 4096, 14336, 4, 64), (4, 6144, 4096, 8, 64),
                                (1, 4096, 14336, 2, 128), (8, 4096, 896, 4, 64)):
        c = tc.config(m, n, k, bits, gs)
        assert (k // gs) % c["U"] == 0 and c["TT"] in (1, 2) and c["NWARP"] in (4, 8)
    assert tc.tiles(40, False) == 3 and tc.tiles(40, True) == 3 and tc.tiles(32, True) == 2
    with pytest.raises(ValueError, match="divide"):
        tc.launch(1, 4096, 896, mx.bfloat16, 4, 64, U=4)    # 14 groups


def test_gemv_route_picks_tc_unless_off(monkeypatch):
    """kernels.qmm's GEMV route: the tensor-core kernel for 2-8 rows where it serves the case (its self-test,
    which needs the GPU, comes after this choice), the scalar kernel for one row and for 2-4 rows it does not
    serve; JANG_GEMV_TC=all puts one row (and the fused variants) on the tensor-core kernel, JANG_GEMV_TC=0
    takes it off."""
    w4, w3, w2 = mx.zeros((64, 512), mx.uint32), mx.zeros((64, 384), mx.uint32), mx.zeros((64, 256), mx.uint32)
    x1, x8 = mx.zeros((1, 4096), mx.bfloat16), mx.zeros((8, 4096), mx.bfloat16)
    monkeypatch.delenv("JANG_GEMV_TC", raising=False)
    assert qmm_mod.gemv_kind(1, x1, w4, 4, 64) == "scalar" and not qmm_mod.gemv_tc_on(1)
    assert qmm_mod.gemv_tc_on(4) == (qmm_mod.FUSED_TC_MIN_ROWS <= 4)      # the fused GEMVs from 2 rows
    assert qmm_mod.gemv_kind(8, x8, w4, 4, 64) == "tc"
    assert qmm_mod.gemv_kind(5, x8[:5], mx.zeros((64, 1024), mx.uint32), 8, 32) == "tc"
    assert qmm_mod.gemv_kind(2, x8[:2], w4, 4, 64) == "tc" and qmm_mod.gemv_kind(4, x8[:4], w2, 2, 64) == "tc"
    assert qmm_mod.gemv_kind(3, x8[:3], w3, 3, 64) == "scalar"          # 3 bits: the scalar GEMV up to 4 rows
    assert qmm_mod.gemv_kind(8, x8, w3, 3, 64) == "none"                 # 3 bits: mx.quantized_matmul
    assert qmm_mod.gemv_kind(8, x8, w2, 2, 32) == "none"                 # 2 bits at group 32: not served
    assert qmm_mod.gemv_kind(8, x8.astype(mx.float32), w4, 4, 64) == "none"
    assert qmm_mod._cuda_route(8, x8, w4, 4, 64) == "gemv" and qmm_mod._cuda_route(8, x8, w3, 3, 64) == "reference"
    monkeypatch.setenv("JANG_GEMV_TC", "all")
    assert qmm_mod.gemv_kind(1, x1, w4, 4, 64) == "tc" and qmm_mod.gemv_tc_on(1)
    assert qmm_mod.gemv_kind(1, x1, w3, 3, 64) == "scalar"
    monkeypatch.setenv("JANG_GEMV_TC", "0")
    assert qmm_mod.gemv_kind(8, x8, w4, 4, 64) == "none" and qmm_mod.gemv_kind(1, x1, w4, 4, 64) == "scalar"
    assert not qmm_mod.gemv_tc_on(4)
    assert qmm_mod._cuda_route(8, x8, w4, 4, 64) == "reference"


def test_dynamic_shared_memory_near_48k_raises_the_limit():
    # MLX raises a kernel's limit only for requests over 48000 bytes; static shared memory counts against the
    # default 48 KB too, so the 8-bit norm + SwiGLU ring at two rows (47,104 bytes) failed at launch before.
    from jang_serve.kernels.cuda_common import launch_smem
    assert launch_smem(0) == 0 and launch_smem(20000) == 20000 and launch_smem(60000) == 60000
    assert launch_smem(47104) > 48000 and launch_smem(32769) > 48000
    u, stage = tc.pipe_shape(2, 1024, 8, 64, tc.config(2, 272, 1024, 8, 64, True)["U"], 2, 2, norm=True)
    assert 32768 < 4 * tc.PIPE * stage <= 48000      # the case that failed: the request goes above 48000 now
