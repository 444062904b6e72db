"""The pipelined loads of the tensor-core GEMV (PIPE > 0 in kernels/qgemv_tc_source.py) on the CPU: a
byte-level NumPy emulation of one stage -- the cp.async pieces each lane issues (weights, x rows, scales,
biases) into the stage's shared-memory layout, then the words every lane reads back from it -- must give
each lane exactly the registers the direct path loads from global memory (wq, xv, sv, bv, and the norm
weight's words), for every
row mapping (plain, gate/up pairs, RoPE pairs), bit width, group size, row bucket and scale dtype.
The stage size must match kernels/qgemv_tc_cuda.pipe_shape, which sizes the dynamic shared memory."""

import numpy as np
import pytest

from jang_serve.kernels import qgemv_tc_cuda as tc

LANE = np.arange(32)


def row_of(epi, tile, gg, r, n, hd=8):
    no = n // 2
    if epi == 2:
        return min(tile * 8 + gg, no - 1) + r * no
    if epi == 3:
        hh = hd // 2
        o = min(tile * 8 + gg, no - 1)
        return (o // hh) * hd + o % hh + r * hh
    return min(tile * 16 + gg + 8 * r, n - 1)


def stage(epi, bits, gs, u, mm, m, ssize, w, x, sc, bi, tile, ch, nw=None):
    """The bytes one `issue(ch, st)` writes (every lane's cp.async), as the kernel lays them out."""
    n, kw = w.shape
    k = x.shape[1]
    ngr = k // gs
    gb = gs * bits // 8
    pg = gb // 16
    wb, xr = u * 16 * gb, u * gs * 2
    xb, sb = mm * xr, 16 * u * ssize
    nb = u * gs * 2 if nw is not None else 0
    st = np.zeros(wb + xb + 2 * sb + nb, np.uint8)
    wbytes, xbytes = w.view(np.uint8).reshape(n, -1), x.view(np.uint8).reshape(x.shape[0], -1)
    sbytes, bbytes = sc.view(np.uint8).reshape(n, -1), bi.view(np.uint8).reshape(n, -1)
    g0 = ch * u
    for lane in range(32):
        for p in range(lane, u * 16 * pg, 32):
            h, rr, uu = p % pg, (p // pg) % 16, p // (pg * 16)
            row = row_of(epi, tile, rr & 7, rr >> 3, n)
            src = ((g0 + uu) * (gb // 4) + h * 4) * 4
            st[p * 16:p * 16 + 16] = wbytes[row, src:src + 16]
        for q in range(lane, xb // 16, 32):
            mrow, c = q // (xr // 16), q % (xr // 16)
            src = (g0 * gs + c * 8) * 2
            st[wb + q * 16:wb + q * 16 + 16] = xbytes[min(mrow, m - 1), src:src + 16]
        rr = lane & 15
        row = row_of(epi, tile, rr & 7, rr >> 3, n)
        srcb = (sbytes if lane < 16 else bbytes)[row, g0 * ssize:(g0 + u) * ssize]
        dst = wb + xb + (0 if lane < 16 else sb) + rr * u * ssize
        st[dst:dst + u * ssize] = srcb
        for q in range(lane, nb // 16, 32):
            src = (g0 * gs + q * 8) * 2
            st[wb + xb + 2 * sb + q * 16:wb + xb + 2 * sb + q * 16 + 16] = nw.view(np.uint8)[src:src + 16]
    return st


@pytest.mark.parametrize("epi,bits,gs,mm,m,sdt,norm", [
    (0, 4, 64, 1, 1, np.uint16, False), (0, 2, 64, 8, 5, np.uint16, False), (0, 8, 64, 1, 1, np.uint32, True),
    (0, 4, 32, 2, 2, np.uint16, True), (0, 4, 128, 4, 3, np.uint16, False), (2, 4, 64, 1, 1, np.uint16, True),
    (3, 8, 32, 4, 4, np.uint16, True), (1, 8, 128, 1, 1, np.uint32, False), (0, 2, 128, 8, 8, np.uint16, False),
])
def test_stage_reads_equal_direct_loads(epi, bits, gs, mm, m, sdt, norm):
    rng = np.random.default_rng(bits * 1000 + gs + mm)
    n, k = (48 if epi in (2, 3) else 40), 512
    ssize = np.dtype(sdt).itemsize
    kw, ngr = k * bits // 32, k // gs
    u0 = tc.config(m, n, k, bits, gs)["U"]
    shape = tc.pipe_shape(m, k, bits, gs, u0, ssize, norm=norm)
    assert shape is not None
    u, stb = shape
    w = rng.integers(0, 2**32, (n, kw), dtype=np.uint64).astype(np.uint32)
    x = rng.integers(0, 2**16, (m, k), dtype=np.uint32).astype(np.uint16)
    sc = rng.integers(0, 2**31, (n, ngr), dtype=np.uint64).astype(sdt)
    bi = rng.integers(0, 2**31, (n, ngr), dtype=np.uint64).astype(sdt)
    nw = rng.integers(0, 2**16, (k,), dtype=np.uint32).astype(np.uint16) if norm else None
    gb, wl, kl = gs * bits // 8, gs * bits // 128, gs // 4
    xl = kl // 2
    wb, xr = u * 16 * gb, u * gs * 2
    xb = mm * xr
    tiles = tc.tiles(n, epi in (2, 3))
    for tile in range(tiles):
        for ch in range(ngr // u):
            st = stage(epi, bits, gs, u, mm, m, ssize, w, x, sc, bi, tile, ch, nw)
            assert st.size == stb
            words = st.view(np.uint32)
            for lane in LANE:
                g, t = lane >> 2, lane & 3
                for uu in range(u):
                    grp = ch * u + uu
                    for r in range(2):
                        row = row_of(epi, tile, g, r, n)
                        got = words[((uu * 16 + g + 8 * r) * gb) // 4 + t * wl:][:wl]
                        want = w[row, grp * (gs * bits // 32) + t * wl:][:wl]
                        assert np.array_equal(got, want), (tile, ch, lane, uu, r)
                        ss = st[wb + xb:].view(sdt)
                        assert ss[(g + 8 * r) * u + uu] == sc[row, grp]
                        assert ss[16 * u + (g + 8 * r) * u + uu] == bi[row, grp]
                    xrow = min(g, mm - 1)
                    got = words[(wb + xrow * xr + uu * gs * 2) // 4 + t * xl:][:xl]
                    want = x[min(g, m - 1)].view(np.uint32)[(grp * gs + t * kl) // 2:][:xl]
                    assert np.array_equal(got, want), (tile, ch, lane, uu, "x")
                    if norm:   # the lane's norm-weight words: staged base + t * XL, then u * GS / 2
                        base = (wb + xb + 2 * 16 * u * ssize) // 4 + t * xl
                        got = words[base + uu * (gs // 2):][:xl]
                        want = nw.view(np.uint32)[(grp * gs + t * kl) // 2:][:xl]
                        assert np.array_equal(got, want), (tile, ch, lane, uu, "nw")


def test_pipe_shape_rules():
    # bf16 scales: at least two groups per stage (a 4-byte cp.async), at most eight (16 bytes)
    assert tc.pipe_shape(1, 4096, 4, 64, 2, 2)[0] == 2
    assert tc.pipe_shape(1, 4096, 8, 64, 1, 2)[0] == 2
    assert tc.pipe_shape(1, 4096, 8, 64, 1, 4)[0] == 1
    assert tc.pipe_shape(1, 4096, 2, 64, 16, 2) is None          # 32 bytes of scales per row: no single copy
    assert tc.pipe_shape(1, 64 * 7, 4, 64, 2, 2) is None          # 7 groups: U = 2 does not divide them
    assert tc.pipe_shape(1, 4096, 2, 32, 4, 2) is None            # a row's group is 8 bytes
    # stage bytes: weights + x rows of the bucket + scales + biases
    assert tc.pipe_shape(8, 4096, 4, 64, 2, 2)[1] == 2 * 16 * 32 + 8 * 2 * 64 * 2 + 2 * 16 * 2 * 2
