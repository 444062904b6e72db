"""The reference paged attention against per-sequence dense attention; KV writes; KV quantization."""

import mlx.core as mx
import numpy as np
import pytest

from jang_serve.engine.attention import attend_one
from jang_serve.engine.kv_pool import KVPool, bytes_per_token
from jang_serve.engine.paged_attention import paged_attention, write_kv

BS, HKV, HQ, D = 16, 2, 6, 64


def _scenario(kv_quant, window, seed=0):
    """Mixed step: two decodes, a prefill chunk after cached context, a fresh prefill, a decode."""
    mx.random.seed(seed)
    rng = np.random.default_rng(seed)
    ctx = [37, 5, 70, 23, 130]
    qlen = [1, 1, 30, 23, 1]
    pool = KVPool(1, 40, BS, HKV, D, mx.float32, kv_quant[0] if kv_quant else None,
                  kv_quant[1] if kv_quant else 64)
    perm = rng.permutation(40).tolist()
    tables, dense_k, dense_v = [], [], []
    for c in ctx:
        n = -(-c // BS)
        tables.append([perm.pop() for _ in range(n)])
        k = mx.random.normal((c, HKV, D))
        v = mx.random.normal((c, HKV, D))
        slots = mx.array([tables[-1][p // BS] * BS + p % BS for p in range(c)])
        pool.k[0], pool.v[0] = write_kv(pool.k[0], pool.v[0], k, v, slots, pool.kv_quant)
        dense_k.append(k)
        dense_v.append(v)
    width = max(len(t) for t in tables)
    bt = mx.array([t + [0] * (width - len(t)) for t in tables])
    q = mx.random.normal((sum(qlen), HQ, D))
    return pool, bt, ctx, qlen, q, dense_k, dense_v


@pytest.mark.parametrize("window", [None, 8])
def test_paged_attention_matches_dense(window):
    pool, bt, ctx, qlen, q, dk, dv = _scenario(None, window)
    out = paged_attention(q, pool.k[0], pool.v[0], bt, ctx, qlen, 0.125, window, None)
    refs, s = [], 0
    for c, n, k, v in zip(ctx, qlen, dk, dv):
        refs.append(attend_one(q[s:s + n], k, v, 0.125, window))
        s += n
    ref = mx.concatenate(refs)
    assert out.shape == q.shape
    assert mx.allclose(out, ref, atol=1e-5).item()


@pytest.mark.parametrize("bits,group,tol", [(8, 64, 0.01), (8, 32, 0.01), (4, 64, 0.15), (4, 32, 0.12)])
def test_quantized_kv_close_to_dense(bits, group, tol):
    pool, bt, ctx, qlen, q, dk, dv = _scenario((bits, group), None)
    out = paged_attention(q, pool.k[0], pool.v[0], bt, ctx, qlen, 0.125, None, pool.kv_quant)
    refs, s = [], 0
    for c, n, k, v in zip(ctx, qlen, dk, dv):
        refs.append(attend_one(q[s:s + n], k, v, 0.125))
        s += n
    ref = mx.concatenate(refs)
    err = (mx.linalg.norm(out - ref) / mx.linalg.norm(ref)).item()  # relative error
    assert err < tol, err
    assert err > 0  # it really went through quantization


def test_write_kv_updates_pool_in_place():
    pool = KVPool(4, 2048, BS, HKV, D, mx.float32)  # 4 layers x 2 x 16.8 MB
    layer_bytes = pool.k[0].nbytes
    k = mx.random.normal((16, HKV, D))
    mx.eval(k)
    slots = mx.arange(100, 116)
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    for _ in range(3):
        for layer in range(4):
            pool.k[layer], pool.v[layer] = write_kv(pool.k[layer], pool.v[layer], k, k, slots)
        mx.eval(pool.arrays())
    # a copying scatter would need at least one extra layer-sized buffer
    assert mx.get_peak_memory() - base < layer_bytes / 4
    assert mx.array_equal(pool.k[3].reshape(-1, HKV, D)[100:116], k).item()


def test_q4_holds_3x_tokens_of_16bit_in_same_memory():
    # SmolLM2-135M attention shape: 30 layers, 3 KV heads, head_dim 64
    b16 = bytes_per_token(30, 3, 64, mx.bfloat16, None)
    b8 = bytes_per_token(30, 3, 64, mx.bfloat16, 8, 64)
    b4 = bytes_per_token(30, 3, 64, mx.bfloat16, 4, 32)  # q4 default: group 32
    assert b16 / b4 >= 3.0 and b16 / b8 >= 1.7

    class Shape:
        num_layers, kv_heads, head_dim = 30, 3, 64

    from jang_serve.engine.engine_config import EngineConfig

    p16 = KVPool.for_model(Shape, EngineConfig(kv_memory_gb=0.02), mx.bfloat16)
    p4 = KVPool.for_model(Shape, EngineConfig(kv_memory_gb=0.02, kv_dtype="q4"), mx.bfloat16)
    assert p4.capacity_tokens >= 3 * p16.capacity_tokens
    assert p4.nbytes <= 0.02e9 and p16.nbytes <= 0.02e9


def test_kv_transform_is_exact():
    from engine_helpers import tiny_model
    from jang_serve.engine.kv_transform import KVTransform, block_hadamard

    h = block_hadamard(96)
    assert np.allclose(h @ h, np.eye(96), atol=1e-6) and np.allclose(h, h.T)
    model, _ = tiny_model(num_attention_heads=4, num_key_value_heads=2, hidden_size=128)  # head_dim 32
    tf = KVTransform(model)
    assert all(s is not None and s.shape == (2, 32) for s in tf.k_scale)
    assert not mx.allclose(tf.k_scale[0], mx.ones_like(tf.k_scale[0])).item()
    mx.random.seed(3)
    q, k, v = mx.random.normal((7, 4, 32)), mx.random.normal((7, 2, 32)), mx.random.normal((7, 2, 32))
    ref = attend_one(q, k, v, 0.2)
    assert all(t is not None and t.shape == (2, 32) for t in tf.v_scale)
    out = tf.output(1, attend_one(tf.queries(1, q), tf.keys(1, k), tf.values(1, v), 0.2))
    assert mx.allclose(out, ref, atol=1e-5).item()


def test_kv_transform_reads_fused_projections():
    """GPU engines fuse q/k/v (layers.fuse_projections); a KV transform built on the fused model
    gets the same scales as on the separate projections."""
    from engine_helpers import tiny_model
    from jang_serve.engine.kv_transform import KVTransform
    from jang_serve.engine.models.layers import fuse_projections

    model, _ = tiny_model(num_attention_heads=4, num_key_value_heads=2, hidden_size=128)
    before = KVTransform(model)
    assert fuse_projections(model) > 0 and "k_proj" not in model.model.layers[0].self_attn
    after = KVTransform(model)
    for a, b in zip(before.k_scale + before.v_scale, after.k_scale + after.v_scale):
        assert mx.allclose(a, b, atol=1e-6).item()


def _prefill_scenario(ctx, qlen, kv_quant=None, seed=1):
    mx.random.seed(seed)
    rng = np.random.default_rng(seed)
    nblocks = sum(-(-c // BS) for c in ctx) + 4
    pool = KVPool(1, nblocks, BS, HKV, D, mx.float32, kv_quant[0] if kv_quant else None,
                  kv_quant[1] if kv_quant else 64)
    perm = rng.permutation(nblocks).tolist()
    tables, dk, dv = [], [], []
    for c in ctx:
        tables.append([perm.pop() for _ in range(-(-c // BS))])
        k, v = mx.random.normal((c, HKV, D)), mx.random.normal((c, HKV, D))
        slots = mx.array([tables[-1][p // BS] * BS + p % BS for p in range(c)])
        pool.k[0], pool.v[0] = write_kv(pool.k[0], pool.v[0], k, v, slots, pool.kv_quant)
        if kv_quant:  # what the pool holds: the reference attends over the same rounded KV
            from jang_serve.engine.paged_attention import gather_kv
            blocks = mx.array(tables[-1])
            k = gather_kv(pool.k[0], blocks, kv_quant, mx.float32)[:c]
            v = gather_kv(pool.v[0], blocks, kv_quant, mx.float32)[:c]
        dk.append(k)
        dv.append(v)
    width = max(len(t) for t in tables)
    bt = mx.array([t + [0] * (width - len(t)) for t in tables])
    return pool, bt, mx.random.normal((sum(qlen), HQ, D)), dk, dv


@pytest.mark.parametrize("kv_quant,window", [(None, None), (None, 9), ((8, 32), None), ((4, 64), 20)])
def test_padded_prefill_batch_matches_per_sequence(kv_quant, window):
    """Decodes, then six prefill sequences of different lengths (fresh prompts and chunks after a
    cached prefix) that the step pads into one attention call; every row equals dense attention."""
    from jang_serve.engine.paged_prefill import worth_batching

    ctx = [40, 3, 33, 48, 20, 60, 45, 17]
    qlen = [1, 1, 33, 30, 20, 28, 45, 17]
    assert worth_batching(qlen[2:], ctx[2:], BS)
    pool, bt, q, dk, dv = _prefill_scenario(ctx, qlen, kv_quant)
    plans: dict = {}
    out = paged_attention(q, pool.k[0], pool.v[0], bt, ctx, qlen, 0.125, window, pool.kv_quant,
                          prefill_plans=plans)
    assert list(plans) == [(2, 8, window)]  # the six prefills went through one padded plan
    refs, s = [], 0
    for n, k, v in zip(qlen, dk, dv):
        refs.append(attend_one(q[s:s + n], k, v, 0.125, window))
        s += n
    assert mx.allclose(out, mx.concatenate(refs), atol=2e-5).item()
    # a second layer of the same step reuses the plan
    again = paged_attention(q, pool.k[0], pool.v[0], bt, ctx, qlen, 0.125, window, pool.kv_quant,
                            prefill_plans=plans)
    assert len(plans) == 1 and mx.array_equal(again, out).item()


def test_padded_prefill_skips_wasteful_runs():
    """A long chunk beside short prompts would pad every short one to the long context: attended one
    by one instead (the run after the outlier may still be batched), with the same result."""
    from jang_serve.engine.paged_prefill import worth_batching

    ctx = [3000, 12, 9, 14]
    qlen = [512, 12, 9, 14]
    assert not worth_batching(qlen, ctx, BS)
    assert worth_batching(qlen[1:], ctx[1:], BS)
    pool, bt, q, dk, dv = _prefill_scenario(ctx, qlen)
    plans: dict = {}
    out = paged_attention(q, pool.k[0], pool.v[0], bt, ctx, qlen, 0.125, None, None, prefill_plans=plans)
    assert [k for k, p in plans.items() if p is not None] == [(1, 4, None)]
    assert plans[(0, 4, None)] is None  # the wasteful run's verdict is kept for the step's other layers
    refs, s = [], 0
    for n, k, v in zip(qlen, dk, dv):
        refs.append(attend_one(q[s:s + n], k, v, 0.125))
        s += n
    assert mx.allclose(out, mx.concatenate(refs), atol=2e-5).item()
