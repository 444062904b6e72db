"""kernels/qkv_epilogue.py where CUDA is absent (the kernel is checked on the device by its self-test and by
bench/decode_checks.py): the composition it stands for, that nothing is decided off CUDA, the RoPE arithmetic it
copies from mx.fast.rope, and where the folded decode links use it."""

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from engine_helpers import tiny_model

from jang_serve.engine.models import compiled as C
from jang_serve.engine.models.layers import RoPE, fuse_projections, quantize_model
from jang_serve.kernels import qkv_epilogue as E


def test_the_reference_is_projection_rope_and_store():
    mx.random.seed(3)
    nh, nkv, hd, k, t = 4, 2, 16, 64, 5
    w = mx.random.normal(((nh + 2 * nkv) * hd, k)) * 0.05
    q, s, b = mx.quantize(w, group_size=32, bits=4)
    xn = mx.random.normal((t, k))
    pos = mx.array([0, 3, 17, 100, 4095], dtype=mx.int32)
    blk, off = mx.array([1, 0, 2, 3, 1], dtype=mx.int32), mx.array([0, 2, 1, 3, 3], dtype=mx.int32)
    rope = RoPE(hd, 10000.0)
    pools = [mx.zeros((4, 4, nkv, hd)) for _ in range(2)]
    got_q, got_k, got_v, kp, vp = E.reference(xn, q, s, b, 4, 32, nh, nkv, hd, pos, rope, pools[0], pools[1], blk,
                                              off)
    y = (xn @ mx.dequantize(q, s, b, group_size=32, bits=4).T).reshape(t, nh + 2 * nkv, hd)
    # RoPE by hand: pair (j, j + hd/2) of each q and k head turned by pos * base^(-2j/hd)
    inv = 10000.0 ** (-np.arange(0, hd, 2) / hd)
    ang = np.array(pos)[:, None] * inv[None]
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
    yn = np.array(y)
    a, c = yn[:, :nh + nkv, :hd // 2], yn[:, :nh + nkv, hd // 2:]
    want_qk = np.concatenate([a * cos - c * sin, a * sin + c * cos], axis=-1)
    assert np.allclose(np.array(got_q), want_qk[:, :nh], atol=1e-4)
    assert np.allclose(np.array(got_k), want_qk[:, nh:], atol=1e-4)
    assert mx.array_equal(got_v, y[:, nh + nkv:]).item()
    for i in range(t):
        assert mx.array_equal(kp[blk[i].item(), off[i].item()], got_k[i]).item()
        assert mx.array_equal(vp[blk[i].item(), off[i].item()], got_v[i]).item()


def test_off_cuda_nothing_is_served_or_decided():
    xn = mx.zeros((8, 64), dtype=mx.bfloat16)
    w = mx.zeros((128, 8), dtype=mx.uint32)
    pools = [mx.zeros((4, 4, 2, 16), dtype=mx.bfloat16) for _ in range(2)]
    i32 = mx.zeros((8,), dtype=mx.int32)
    assert E.qkv_rope_store_rows(xn, w, None, None, 4, 32, n_heads=4, n_kv=2, head_dim=16, positions=i32,
                                 rope=RoPE(16), k_pool=pools[0], v_pool=pools[1], blocks=i32, offsets=i32) is None
    assert E.ready(mx.bfloat16, 4, 2, 16, RoPE(16)) is False
    assert not E._checked                      # decided again where CUDA exists


def test_the_kernel_copies_mx_fast_ropes_arithmetic():
    assert E.rope_params(RoPE(64, traditional=True)) is None          # another pairing of the values
    freqs, log2b, scale = E.rope_params(RoPE(64, 500000.0))
    assert freqs is None and log2b == float(np.float32(math.log2(500000.0))) and scale == 1.0
    odd = E.rope_params(RoPE(64, 10000.008))[1]                     # a base float32 cannot hold: rounded first
    assert odd == float(np.float32(math.log2(np.float32(10000.008))))
    assert odd != float(np.float32(math.log2(10000.008)))              # (where the order of the roundings shows)
    lin = E.rope_params(RoPE(64, 10000.0, scaling={"type": "linear", "factor": 4.0}))
    assert lin[2] == 0.25
    l3 = RoPE(64, 500000.0, scaling={"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192})
    assert E.rope_params(l3)[0] is l3._freqs
    # float32 constants written so that the compiler reads back the very same float
    for v in (math.log2(10000.0), math.log2(500000.0), 0.125, 1 / 3):
        lit = E._f32(v)
        assert lit.endswith("f") and np.float32(float(lit[:-1])) == np.float32(v)
    src = E.SOURCE
    assert "for (int s = 1; s < S; ++s)" in src                                    # splits in order
    assert "const float inv = 1.0 / fr[j];" in src                                 # MLX: 1.0 / freqs
    assert "exp2(-(static_cast<float>(j) / static_cast<float>(HH)) * JANG_LOG2BASE)" in src
    assert "(JANG_SCALE * static_cast<float>(pos[m])) * inv" in src
    assert "ta = static_cast<T>(x1 * cs - x2 * sn);" in src and "tb = static_cast<T>(x1 * sn + x2 * cs);" in src


def test_folded_links_past_the_gemv_rows_go_through_the_store_form():
    model, cfg = tiny_model(seed=13)
    quantize_model(model, lambda path, m: (4, 32) if isinstance(m, nn.Linear) else None)
    fuse_projections(model)
    C.compile_blocks(model)
    try:
        c1 = model.model.layers[1].compiled
        a = model.model.layers[1].self_attn
        assert c1.fused["norm_qkv"]
        t, h = 6, cfg["hidden_size"]
        xn = mx.random.normal((t, h))
        pos = mx.arange(t).astype(mx.int32)
        pools = (mx.zeros((4, 4, a.n_kv, a.hd)), mx.zeros((4, 4, a.n_kv, a.hd)))
        blk, off = mx.zeros((t,), dtype=mx.int32), mx.arange(t).astype(mx.int32) % 4
        q, k, v, stored = c1.pre_normed_store(xn, pos, pools, blk, off, None)
        assert stored is False                     # off CUDA: the composition, the caller writes the pools
        wq, wk, wv = c1.pre_normed(xn, pos)
        assert all(mx.array_equal(g, w).item() for g, w in ((q, wq), (k, wk), (v, wv)))
        qf = a.qkv_fused
        ref = E.reference(xn, qf.weight, qf.scales, qf.biases, qf.bits, qf.group_size, a.n_heads, a.n_kv, a.hd, pos,
                          a.rope, *pools, blk, off)
        assert all(mx.allclose(g, w, atol=1e-5).item() for g, w in zip((q, k, v), ref[:3]))
    finally:
        C.compile_blocks(model, on=False)
