"""The weight-stationary tensor-core GEMM (kernels/qgemm3_cuda.py) on the CPU: a lane-by-lane emulation
of its source (shared-memory byte offsets, the x swizzle, byte_perm selectors, masks and magic
mantissas, the per-half scales, the PTX m16n8k16 fragment layouts, split-K partials) against the
dequantized matmul; bank-conflict freedom of its shared loads; its launch configuration."""

from __future__ import annotations

import numpy as np
import pytest

import mlx.core as mx

from jang_serve.kernels import qgemm3_cuda as q3
from lane_helpers import bperm

U = np.uint32


def bf16_round(a):
    """float -> nearest bfloat16 (ties to even), as float32."""
    b = np.asarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
    return b.astype(np.uint32).view(np.float32)


def halves(v, dtype):
    """A packed pair (uint32) -> its two values (low half first) as float64."""
    lo, hi = (v & U(0xFFFF)).astype(np.uint16), (v >> U(16)).astype(np.uint16)
    if dtype == "bf16":
        f = lambda h: (h.astype(np.uint32) << U(16)).view(np.float32).astype(np.float64)
    else:
        f = lambda h: h.view(np.float16).astype(np.float64)
    return f(lo), f(hi)


def rnd(a, dtype):
    return bf16_round(a).astype(np.float64) if dtype == "bf16" else np.asarray(a).astype(np.float16).astype(np.float64)


def xsw(c, r):
    return c ^ (((c >> 3) & 1) << 1) ^ (r & 1)


def dq_step(wv, j, s, b, bits, dtype):
    """jang::dq_step for every lane at once: wv [lanes, LW] uint32, s / b [lanes] (float64). Returns the
    two pairs as (lo, hi) value arrays: ((v4j, v4j+1), (v4j+2, v4j+3))."""
    mag = U(0x43004300) if dtype == "bf16" else U(0x64006400)
    magv = 128.0 if dtype == "bf16" else 1024.0

    def hfma_sub(v, s_lo, s_hi):
        lo, hi = halves(v, dtype)
        return rnd((lo - magv) * rnd(s_lo, dtype) + rnd(b, dtype), dtype), \
            rnd((hi - magv) * rnd(s_hi, dtype) + rnd(b, dtype), dtype)

    bf = dtype == "bf16"
    if bits == 4:
        w = wv[:, j >> 1]
        out = []
        for i in range(2):
            y = bperm(w, np.zeros_like(w), 0x4040 | ((j & 1) * 2 + i) | (((j & 1) * 2 + i) << 8))
            v = ((y & U(0xF)) | ((y >> U(1)) & U(0x00780000)) | mag) if bf else ((y & U(0x00F0000F)) | mag)
            out.append(hfma_sub(v, s, s / (8 if bf else 16)))
        return tuple(out)
    if bits == 2:
        w = wv[:, j >> 2]
        y = bperm(w, np.zeros_like(w), 0x4040 | (j & 3) | ((j & 3) << 8))
        hi = ((y >> U(2)) & U(0x0030000C)) if bf else (y & U(0x00C00030))
        return (hfma_sub((y & U(0x000C0003)) | mag, s, s / 4),
                hfma_sub(hi | mag, s / 4, s / 16) if bf else hfma_sub(hi | mag, s / 16, s / 64))
    w = wv[:, j]
    if dtype == "fp16":
        return (hfma_sub(bperm(w, np.zeros_like(w), 0x4140) | mag, s, s),
                hfma_sub(bperm(w, np.zeros_like(w), 0x4342) | mag, s, s))
    f = []
    for i in range(4):
        v = bperm(w, np.full_like(w, 0x4B000000), 0x7440 | i).view(np.float32).astype(np.float64) - 8388608.0
        f.append(rnd(np.float32(v * s.astype(np.float32) + b.astype(np.float32)), dtype))
    return (f[0], f[1]), (f[2], f[3])


def emulate(x, wq, sc, bi, bits, gs, cfg, dtype):
    """The kernel, block by block, warp by warp, lane by lane (numpy over the 32 lanes)."""
    nt, tm, split = cfg["NT"], cfg["TM"], cfg["split"]
    M, K = x.shape
    N, KW = wq.shape
    NGR = K // gs
    BF, XR, LB, LW = 128 * tm, 8 * nt, 4 * bits, bits
    WRB = 16 * bits + (16 if bits == 8 else 0)
    wbytes = np.ascontiguousarray(wq).view(np.uint8).reshape(N, KW * 4)
    xh = x.astype(np.float64)
    ws = np.zeros((split, M, N))
    lane = np.arange(32)
    g, t = lane >> 2, lane & 3
    kper = K // split
    for bx in range(-(-M // XR)):
        for by in range(N // BF):
            for bz in range(split):
                m0, f0, kbeg = bx * XR, by * BF, bz * kper
                acc = np.zeros((BF, XR))
                for kt in range(kper // q3.KS):
                    k0 = kbeg + kt * q3.KS
                    wsm = np.zeros(BF * WRB, dtype=np.uint8)      # the stage's shared memory, as cp16 fills it
                    for r in range(BF):
                        for c in range(bits):
                            src = k0 * bits // 8 + c * 16
                            wsm[r * WRB + c * 16: r * WRB + c * 16 + 16] = wbytes[f0 + r, src:src + 16]
                    xsm = np.zeros((XR * 256 // 2,))
                    for r in range(XR):
                        for c in range(16):
                            if m0 + r < M:
                                d = (r * 256 + (xsw(c, r) << 4)) // 2
                                xsm[d:d + 8] = xh[m0 + r, k0 + c * 8: k0 + c * 8 + 8]
                    grp = (k0 + 32 * t) // gs
                    for warp in range(8):
                        wrow = warp * 16 * tm
                        for a in range(tm):
                            rows = [wrow + a * 16 + g + 8 * h for h in range(2)]
                            wv = [np.stack([wsm[rw * WRB + t * LB + 4 * u: rw * WRB + t * LB + 4 * u + 4].copy()
                                            .view(np.uint32)[0] for rw, t in zip(rr, t)]) for rr in rows
                                  for u in range(LW)]
                            wv = [np.stack(wv[h * LW:(h + 1) * LW], axis=1) for h in range(2)]
                            s = [sc[f0 + rr, grp] for rr in rows]
                            b_ = [bi[f0 + rr, grp] for rr in rows]
                            for j in range(8):
                                p0 = dq_step(wv[0], j, s[0], b_[0], bits, dtype)
                                p1 = dq_step(wv[1], j, s[1], b_[1], bits, dtype)
                                A = np.zeros((16, 16))   # a0 = A[g][2t,2t+1], a1 = A[g+8][..], a2 = A[g][2t+8,..], a3
                                for reg, (rowoff, koff, pr) in enumerate(((0, 0, p0[0]), (8, 0, p1[0]), (0, 8, p0[1]),
                                                                          (8, 8, p1[1]))):
                                    A[g + rowoff, 2 * t + koff] = pr[0]
                                    A[g + rowoff, 2 * t + koff + 1] = pr[1]
                                q, jj = j >> 1, j & 1
                                for n in range(nt):
                                    r = n * 8 + g
                                    base = (r * 256 + (xsw(4 * t + q, r) << 4)) // 2 + 4 * jj
                                    B = np.zeros((16, 8))  # b0 = B[2t, 2t+1][g], b1 = B[2t+8, 2t+9][g]
                                    for e in range(4):
                                        B[2 * t + (e & 1) + 8 * (e >> 1), g] = xsm[base + e]
                                    acc[a * 16 + wrow: a * 16 + wrow + 16, n * 8: n * 8 + 8] += A @ B
                rows = min(XR, M - m0)
                ws[bz, m0:m0 + rows, f0:f0 + BF] = acc[:, :rows].T
    return ws.sum(0)


CASES = [  # bits, gs, dtype, M, N, K, cfg overrides
    (4, 64, "bf16", 20, 256, 256, dict(NT=4, TM=2, split=1)),
    (4, 32, "fp16", 9, 128, 512, dict(NT=2, TM=1, split=2)),
    (2, 32, "bf16", 16, 128, 256, dict(NT=2, TM=1, split=1)),
    (2, 128, "fp16", 7, 256, 256, dict(NT=2, TM=2, split=2)),
    (8, 64, "bf16", 12, 128, 256, dict(NT=2, TM=1, split=1)),
    (8, 128, "fp16", 17, 128, 256, dict(NT=4, TM=1, split=2)),
]


@pytest.mark.parametrize("bits,gs,dtype,M,N,K,over", CASES)
def test_lane_emulation_matches_dequantized_matmul(bits, gs, dtype, M, N, K, over):
    mx.random.seed(bits * 100 + gs + M)
    mdt = mx.bfloat16 if dtype == "bf16" else mx.float16
    w = (mx.random.normal((N, K)) * 0.05).astype(mdt)
    wq, sc, bi = mx.quantize(w, group_size=gs, bits=bits)
    x = mx.random.normal((M, K)).astype(mdt)
    cfg = q3.config(M, N, K, bits, **over, stages=2)
    got = emulate(np.array(x.astype(mx.float32)), np.array(wq), np.array(sc.astype(mx.float32)).astype(np.float64),
                  np.array(bi.astype(mx.float32)).astype(np.float64), bits, gs, cfg, dtype)
    wd = mx.dequantize(wq, sc.astype(mx.float32), bi.astype(mx.float32), group_size=gs, bits=bits)
    ref = np.array(x.astype(mx.float32) @ wd.T).astype(np.float64)
    err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert err < 4e-3, err


def test_shared_loads_are_bank_conflict_free():
    lane = np.arange(32)
    g, t = lane >> 2, lane & 3
    for q in range(4):            # x: 128-bit loads, phases of 8 lanes
        for n in range(8):
            r = n * 8 + g
            addr = r * 256 + (xsw(4 * t + q, r) << 4)
            for ph in range(4):
                banks = (addr[ph * 8:(ph + 1) * 8] // 16) % 8
                assert len(set(banks.tolist())) == 8
    for bits in (2, 4, 8):        # weights: the lane's 4*bits bytes of rows g (+8)
        wrb, lb = 16 * bits + (16 if bits == 8 else 0), 4 * bits
        width = min(lb, 16)
        per_phase = 128 // width
        for h in range(2):
            addr = (g + 8 * h) * wrb + t * lb
            for ph in range(32 // per_phase):
                sl = addr[ph * per_phase:(ph + 1) * per_phase]
                units = set(((sl // width) % (128 // width)).tolist())
                assert len(units) == per_phase, (bits, h, ph)
    for r in range(64):           # the swizzle is a permutation of a row's 16 chunks
        assert sorted(xsw(c, r) for c in range(16)) == list(range(16))


def test_config_rules():
    c = q3.config(64, 14336, 4096, 4)
    assert c["NT"] == 8 and c["TM"] == 2
    assert (14336 // 256) * c["split"] <= q3.TARGET_BLOCKS < (14336 // 256) * c["split"] * 2
    c = q3.config(64, 4096, 14336, 4)
    assert c["split"] == 8 and 14336 % (128 * 8) == 0
    assert q3.config(16, 4096, 4096, 4)["NT"] == 2 and q3.config(30, 4096, 4096, 4)["NT"] == 4
    assert q3.config(256, 14336, 4096, 4)["split"] == 1          # 4 row chunks x 56 feature blocks fill the GPU
    assert q3.config(64, 896 * 3, 4096, 4)["TM"] == 1             # N % 256 != 0
    assert q3.default_stages(8, 8, 2) * q3.stage_bytes(8, 8, 2) <= q3.SMEM_MAX
    with pytest.raises(ValueError):
        q3.config(64, 4096, 4096, 4, split=64)
    x = mx.zeros((64, 4096), dtype=mx.bfloat16)
    w = mx.zeros((1000, 512), dtype=mx.uint32)
    assert not q3.supports(x, w, 4, 64)
    assert q3.supports(x, mx.zeros((1024, 512), dtype=mx.uint32), 4, 64)
