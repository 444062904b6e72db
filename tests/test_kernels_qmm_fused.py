"""kernels.qmm_fused on the CPU: the composition it specifies, its input checks, and a NumPy port of
the fused GEMV variants' arithmetic (team -> row mapping with gate/up row pairs, the norm's 1/rms
applied after the dot products, the residual added before rounding) against that composition."""

import math

import mlx.core as mx
import numpy as np
import pytest

from jang_serve.kernels import qmm
from jang_serve.kernels.qmm_fused import kernel_supported, qmm_fused, qmm_fused_reference

K, N, GS, BITS = 256, 96, 64, 4


def _weights(n=N, k=K, bits=BITS, gs=GS, seed=0):
    mx.random.seed(seed)
    return mx.quantize(mx.random.normal((n, k)) * 0.1, group_size=gs, bits=bits)


def test_composition_matches_the_unfused_ops():
    wq, s, b = _weights()
    x = mx.random.normal((3, K))
    nw = mx.random.normal((K,)) * 0.2 + 1
    r = mx.random.normal((3, N))
    h = mx.fast.rms_norm(x, nw, 1e-6)
    assert mx.allclose(qmm_fused(x, wq, s, b, BITS, GS, norm_weight=nw, eps=1e-6), qmm(h, wq, s, b, BITS, GS)).item()
    assert mx.allclose(qmm_fused(x, wq, s, b, BITS, GS, residual=r), qmm(x, wq, s, b, BITS, GS) + r).item()
    g, u = mx.split(qmm(h, wq, s, b, BITS, GS), 2, axis=-1)
    got = qmm_fused(x, wq, s, b, BITS, GS, norm_weight=nw, eps=1e-6, swiglu=True)
    assert got.shape == (3, N // 2)
    assert mx.allclose(got, g * mx.sigmoid(g) * u, atol=1e-6).item()


def test_bad_inputs_name_the_problem():
    wq, s, b = _weights()
    x = mx.zeros((1, K))
    with pytest.raises(ValueError, match="norm_weight"):
        qmm_fused(x, wq, s, b, BITS, GS, norm_weight=mx.ones((K + 1,)))
    with pytest.raises(ValueError, match="residual"):
        qmm_fused(x, wq, s, b, BITS, GS, residual=mx.zeros((1, N // 2)))
    wo, so, bo = _weights(n=97)
    with pytest.raises(ValueError, match="even N"):
        qmm_fused(x, wo, so, bo, BITS, GS, swiglu=True)


def test_kernel_takes_only_decode_sizes_in_its_dtype():
    wq, s, b = _weights()
    xb = mx.zeros((1, K), dtype=mx.bfloat16)
    assert kernel_supported(xb, wq, BITS, GS, mx.ones((K,), mx.bfloat16), None, True)
    assert not kernel_supported(mx.zeros((5, K), mx.bfloat16), wq, BITS, GS, None, None, False)  # > 4 rows
    assert not kernel_supported(xb, wq, BITS, GS, mx.ones((K,), mx.float32), None, False)        # norm dtype
    assert not kernel_supported(mx.zeros((1, K)), wq, BITS, GS, None, None, False)              # float32 x


def _port(x, wq, s, b, nw=None, eps=1e-5, res=None, swiglu=False, R=8, W=1):
    """The fused kernel's work split and arithmetic in NumPy (float64): teams of rows, per group
    scale*sum(x'*q) + bias*sum(x') with x' = x*nw, sum(x^2) alongside, 1/rms applied at the end."""
    x = np.array(x, dtype=np.float64)
    q = np.array(mx.dequantize(wq, mx.ones_like(s), mx.zeros_like(b), group_size=GS, bits=BITS), dtype=np.float64)
    sc, bi = np.array(s, dtype=np.float64), np.array(b, dtype=np.float64)
    m, k = x.shape
    n = q.shape[0]
    teams = 4 // W
    ro = R // 2 if swiglu else R
    n_out = n // 2 if swiglu else n
    blocks = math.ceil(n_out / (ro * teams))
    y = np.full((m, n_out), np.nan)
    for blk in range(blocks):
        for team in range(teams):
            row0 = (blk * teams + team) * ro
            rows = [min(row0 + r, n_out - 1) if r < ro or not swiglu else n_out + min(row0 + r - ro, n_out - 1)
                    for r in range(R)]
            for mi in range(m):
                xv = x[mi] * (np.array(nw, dtype=np.float64) if nw is not None else 1.0)
                ss = float((x[mi] ** 2).sum())
                inv = 1 / math.sqrt(ss / k + eps) if nw is not None else 1.0
                sums = []
                for row in rows:
                    acc = 0.0
                    for g in range(k // GS):
                        sl = slice(g * GS, (g + 1) * GS)
                        acc += sc[row, g] * (xv[sl] * q[row, sl]).sum() + bi[row, g] * xv[sl].sum()
                    sums.append(acc * inv)
                for r in range(ro):
                    if row0 + r >= n_out:
                        continue
                    if swiglu:
                        gv, uv = sums[r], sums[r + ro]
                        v = gv / (1 + math.exp(-gv)) * uv
                    else:
                        v = sums[r] + (float(res[mi, row0 + r]) if res is not None else 0.0)
                    y[mi, row0 + r] = v
    assert not np.isnan(y).any()  # every output row written exactly by some team
    return y


@pytest.mark.parametrize("mode", ["norm", "residual", "norm+swiglu", "swiglu"])
@pytest.mark.parametrize("R,W", [(8, 1), (4, 2), (2, 4)])
def test_numpy_port_of_fused_kernel_matches_composition(mode, R, W):
    wq, s, b = _weights(n=104, seed=3)   # 104 rows: the last team of a block is partial
    x = mx.random.normal((2, K))
    nw = mx.random.normal((K,)) * 0.2 + 1 if "norm" in mode else None
    sw = "swiglu" in mode
    res = mx.random.normal((2, 104)) if mode == "residual" else None
    want = qmm_fused_reference(x, wq, s, b, BITS, GS, nw, 1e-5, res, sw)
    got = _port(x, wq, s, b, nw, 1e-5, res, sw, R=R, W=W)
    assert got.shape == want.shape
    assert np.allclose(got, np.array(want), atol=2e-4, rtol=2e-4)


def _rotate_np(y, pos, inv, nrot, hd):
    """y [T, H, hd] float64: the kernel's epilogue, pair (j, j + hd/2) of the first nrot heads."""
    out = y.copy()
    hh = hd // 2
    for t in range(y.shape[0]):
        th = pos[t] * inv
        c, s = np.cos(th), np.sin(th)
        a, b = y[t, :nrot, :hh], y[t, :nrot, hh:]
        out[t, :nrot, :hh] = a * c - b * s
        out[t, :nrot, hh:] = a * s + b * c
    return out


@pytest.mark.parametrize("scaling", [None, {"rope_type": "linear", "factor": 2.0},
                                     {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}])
def test_rope_inv_freq_reproduces_mx_fast_rope(scaling):
    from jang_serve.engine.models.layers import RoPE
    from jang_serve.kernels.qmm_fused import rope_inv_freq

    hd = 64
    rope = RoPE(hd, base=10000.0, scaling=scaling)
    inv = np.array(rope_inv_freq(rope.dims, rope.base, rope.scale, rope._freqs), dtype=np.float64)
    y = mx.random.normal((3, 5, hd))
    pos = mx.array([0, 17, 900], dtype=mx.int32)
    want = np.array(rope(y, pos))
    got = _rotate_np(np.array(y, dtype=np.float64), np.array(pos), inv, 5, hd)
    assert np.allclose(got, want, atol=2e-4)


def test_numpy_port_of_rope_epilogue_matches_qkv_rope_composition():
    """Team -> pair mapping (rows h*hd + j and h*hd + j + hd/2), rotation of q and k heads only, on the
    normed matmul: against kernels.qmm_fused.qkv_rope's composition with the model's RoPE module."""
    from jang_serve.engine.models.layers import RoPE
    from jang_serve.kernels.qmm_fused import qkv_rope, rope_inv_freq

    nh, nkv, hd = 4, 2, 32
    n = (nh + 2 * nkv) * hd
    wq, s, b = _weights(n=n, seed=5)
    x = mx.random.normal((2, K))
    nw = mx.random.normal((K,)) * 0.2 + 1
    pos = mx.array([3, 250], dtype=mx.int32)
    rope = RoPE(hd, base=500000.0)
    inv = rope_inv_freq(hd, rope.base, rope.scale, None)
    q, k, v = qkv_rope(x, wq, s, b, BITS, GS, n_heads=nh, n_kv=nkv, head_dim=hd, positions=pos, inv_freq=inv,
                       rope=rope, norm_weight=nw, eps=1e-5)
    assert q.shape == (2, nh, hd) and k.shape == (2, nkv, hd) and v.shape == (2, nkv, hd)
    want = np.concatenate([np.array(q), np.array(k), np.array(v)], axis=1)

    # the kernel's arithmetic: per team R/2 pairs; each pair's two row sums, then the rotation
    sums = _port(x, wq, s, b, nw, 1e-5)                  # [2, n] normed matmul (the port above)
    R, teams = 8, 4
    pairs, ro = n // 2, R // 2
    got = np.full((2, n), np.nan)
    hh = hd // 2
    invn = np.array(inv, dtype=np.float64)
    for blk in range(math.ceil(pairs / (ro * teams))):
        for team in range(teams):
            row0 = (blk * teams + team) * ro
            for r in range(ro):
                p = row0 + r
                if p >= pairs:
                    continue
                h, j = p // hh, p % hh
                n0, n1 = h * hd + j, h * hd + j + hh
                for m in range(2):
                    a, bb = sums[m, n0], sums[m, n1]
                    if h < nh + nkv:
                        th = int(pos[m]) * invn[j]
                        a, bb = a * math.cos(th) - bb * math.sin(th), a * math.sin(th) + bb * math.cos(th)
                    got[m, n0], got[m, n1] = a, bb
    assert not np.isnan(got).any()
    assert np.allclose(got.reshape(2, nh + 2 * nkv, hd), want, atol=3e-4, rtol=3e-4)


def test_qkv_rope_checks_the_joint_shape():
    from jang_serve.engine.models.layers import RoPE
    from jang_serve.kernels.qmm_fused import qkv_rope

    wq, s, b = _weights(n=96)
    with pytest.raises(ValueError, match="rows"):
        qkv_rope(mx.zeros((1, K)), wq, s, b, BITS, GS, n_heads=4, n_kv=2, head_dim=32,
                 positions=mx.array([0], dtype=mx.int32), inv_freq=mx.ones((16,)), rope=RoPE(32))
