"""kernels/gemm_epilogue.py where CUDA is absent (the kernel is checked on the device by its self-test, by
bench/epilogue_bench.py and bench/decode_checks.py): the composition it stands for, that nothing is decided off
CUDA, and where the compiled decode links use it."""

import mlx.core as mx
import mlx.nn as nn
from engine_helpers import tiny_model

from jang_serve.engine.models import compiled as C
from jang_serve.engine.models.layers import quantize_model
from jang_serve.kernels import gemm_epilogue
from jang_serve.kernels.qmm import partials_plan, qmm


def _case(m=6, k=128, n=64, bits=4):
    mx.random.seed(4)
    w = mx.random.normal((n, k)) * 0.05
    q, s, b = mx.quantize(w, group_size=64, bits=bits)
    a = mx.random.normal((m, k))
    r = mx.random.normal((m, n))
    nw = 1.0 + 0.1 * mx.random.normal((n,))
    return a, q, s, b, r, nw


def test_off_cuda_it_is_the_composition():
    a, q, s, b, r, nw = _case()
    h, hn = gemm_epilogue.qmm_add_norm(a, q, s, b, 4, 64, r, nw, 1e-5)
    y = qmm(a, q, s, b, 4, 64)
    assert mx.array_equal(h, y + r).item()
    assert mx.array_equal(hn, mx.fast.rms_norm(y + r, nw, 1e-5)).item()
    # and the composition is what it claims: residual + x @ dequant(w).T, then x / rms * w
    wd = mx.dequantize(q, s, b, group_size=64, bits=4)
    want = r + a @ wd.T
    assert mx.allclose(h, want, atol=1e-4).item()
    rms = mx.sqrt(mx.mean(want * want, axis=-1, keepdims=True) + 1e-5)
    assert mx.allclose(hn, want / rms * nw, atol=1e-4).item()


def test_off_cuda_nothing_is_planned_or_decided():
    a, q, s, b, r, nw = _case()
    assert partials_plan(a, q, s, b, 4, 64) is None
    assert gemm_epilogue.ready(mx.bfloat16, 1e-5) is False
    assert not gemm_epilogue._checked                  # decided again where CUDA exists
    assert not gemm_epilogue.supported(r, nw)          # float32: the kernel takes bf16 / fp16 only
    assert gemm_epilogue.supported(r.astype(mx.bfloat16), nw.astype(mx.bfloat16))
    assert not gemm_epilogue.supported(r.astype(mx.bfloat16), nw)   # norm weight of another dtype


def test_the_kernel_reads_partials_in_split_order_and_rounds_like_the_ops():
    src = gemm_epilogue.SOURCE
    assert "for (int s = 1; s < S; ++s)" in src                           # splits summed in order
    assert "static_cast<T>(static_cast<float>(static_cast<T>(v[i])) + static_cast<float>(rr[j + i]))" in src
    assert "rsqrtf(part[0] / (float)N + JANG_EPS)" in src                  # MLX's normalizer
    assert "static_cast<float>(nw[j + i]) * static_cast<float>(y)" in src  # w * T(h * inv), as MLX writes it


def test_links_past_the_gemv_rows_end_in_the_next_blocks_norm():
    model, cfg = tiny_model(seed=12)
    quantize_model(model, lambda path, m: (4, 32) if isinstance(m, nn.Linear) else None)
    C.compile_blocks(model)
    try:
        blocks = [b.compiled for b in model.model.layers]
        h = cfg["hidden_size"]
        assert all(c.norm_ahead_ok for c in blocks)
        assert C._norm_ahead(blocks[0], mx.zeros((5, h)))          # 5 rows: past the fused decode GEMVs
        assert not C._norm_ahead(blocks[0], mx.zeros((4, h)))      # 1-4 rows: the GEMVs fold the norms
        assert not C._norm_ahead(blocks[-1], mx.zeros((5, h)))     # the last block has no next norm
        # post_n is post plus the next block's input norm
        x = mx.random.normal((5, h))
        o = mx.random.normal((5, model.model.layers[0].self_attn.n_heads, model.model.layers[0].self_attn.hd))
        got_h, got_hn = blocks[0].post_n(x, o, model.model.layers[1].input_layernorm)
        want_h = blocks[0].post_eager(x, o)
        assert mx.allclose(got_h, want_h, atol=1e-5).item()
        assert mx.allclose(got_hn, model.model.layers[1].input_layernorm(want_h), atol=1e-5).item()
    finally:
        C.compile_blocks(model, on=False)
