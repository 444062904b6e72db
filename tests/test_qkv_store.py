"""kernels/qkv_store.py where CUDA is absent (the CUDA kernel is checked on the device by its self-test and by
bench/decode_checks.py): the variant's build inputs, and that nothing is stored or decided off CUDA."""

import mlx.core as mx

from jang_serve.kernels import qkv_store, qmm_cuda
from jang_serve.kernels.qmm_fused import rope_inv_freq


def test_store_variant_takes_the_pools_and_slots_after_the_rope_inputs():
    defines, names = qmm_cuda.fused_variant(3, True, 1e-5, (128, 40, 32))
    assert "#define JANG_KVW 32\n" in defines and "#define JANG_NROT 40\n" in defines
    assert names[-6:] == ["rpos", "rfreq", "kpool", "vpool", "kvb", "kvo"]
    plain_defines, plain_names = qmm_cuda.fused_variant(3, True, 1e-5, (128, 40))
    assert "JANG_KVW" not in plain_defines and plain_names == names[:-4]
    assert "#ifdef JANG_KVW" in qmm_cuda.SOURCE and "const_cast<T*>(kh < NKV ? kpool : vpool)" in qmm_cuda.SOURCE


def test_off_cuda_nothing_is_stored_and_no_verdict_is_kept():
    hd, nq, nkv, k = 8, 2, 1, 128
    w = mx.zeros(((nq + 2 * nkv) * hd, k * 4 // 32), dtype=mx.uint32)
    s = mx.ones(((nq + 2 * nkv) * hd, k // 64), dtype=mx.bfloat16)
    pool = mx.zeros((2, 4, nkv, hd), dtype=mx.bfloat16)
    idx = mx.array([1, 0, 0, 0], dtype=mx.int32)[:1]
    got = qkv_store.qkv_rope_store(mx.ones((1, k), dtype=mx.bfloat16), w, s, s, 4, 64, n_heads=nq, n_kv=nkv,
                                   head_dim=hd, positions=idx, inv_freq=rope_inv_freq(hd, 10000.0), k_pool=pool,
                                   v_pool=pool, blocks=idx, offsets=idx)
    assert got is None                                # the caller writes the pools itself
    assert qkv_store.ready(mx.bfloat16, 4, 64, nq, nkv, hd, norm=True) is False
    assert not qkv_store._checked                     # decided again where CUDA exists
    assert mx.array_equal(pool, mx.zeros_like(pool)).item()
