"""Paged attention decode and the KV write on the CPU: the kernels' batched decode reference against
the engine's per-sequence path (gather the blocks, attend one sequence with its causal/window mask),
write_kv against the engine's, and a NumPy port of the CUDA kernel's split-K algorithm (parts over
the window, per-part max / sum, merge) against the reference."""

import numpy as np
import pytest

import mlx.core as mx

from jang_serve.engine import paged_attention as engine_pa
from jang_serve.engine.attention import attend_one
from jang_serve.kernels import paged_attention_decode, paged_decode_reference, write_kv
from jang_serve.kernels import paged_cuda

NB, BS = 24, 8


def _pools(hkv, d, kv_quant, seed=0):
    mx.random.seed(seed)
    k = mx.random.normal((NB, BS, hkv, d))
    v = mx.random.normal((NB, BS, hkv, d))
    if kv_quant is None:
        return k, v
    bits, g = kv_quant
    return tuple(mx.quantize(k, group_size=g, bits=bits)), tuple(mx.quantize(v, group_size=g, bits=bits))


def test_fp16_scales_dequantize_in_the_compute_dtype():
    """The engine's KV pool keeps float16 scales for float32 models: the kernels' reference must
    dequantize with them cast to the compute dtype, exactly as the engine's reference does."""
    kp, vp = _pools(2, 64, (4, 32))
    kp = (kp[0], kp[1].astype(mx.float16), kp[2].astype(mx.float16))
    vp = (vp[0], vp[1].astype(mx.float16), vp[2].astype(mx.float16))
    tables, lens = _tables(2, 6), [40, 7]
    q = mx.random.normal((2, 8, 64))
    ours = paged_attention_decode(q, kp, vp, tables, lens, 0.125, None, (4, 32))
    theirs = _engine_decode(q, kp, vp, tables, lens, 0.125, None, (4, 32))
    assert mx.allclose(ours, theirs, atol=1e-6).item()


def _engine_decode(q, kp, vp, tables, lens, scale, window, kv_quant):
    """The engine's own path for one query per sequence: gather_kv of the sequence's blocks, then
    attend_one (its prefill attention) with the query at position ctx - 1; zeros for an empty context."""
    outs = []
    for b, ctx in enumerate(lens):
        if ctx == 0:
            outs.append(mx.zeros(q.shape[1:], dtype=q.dtype))
            continue
        nblk = -(-ctx // BS)
        k = engine_pa.gather_kv(kp, tables[b, :nblk], kv_quant, q.dtype)[:ctx]
        v = engine_pa.gather_kv(vp, tables[b, :nblk], kv_quant, q.dtype)[:ctx]
        outs.append(attend_one(q[b:b + 1], k, v, scale, window)[0])
    return mx.stack(outs)


def _tables(b, nblk, seed=1):
    rng = np.random.default_rng(seed)
    return mx.array(rng.permutation(NB)[: b * nblk].reshape(b, nblk).astype(np.int32))


@pytest.mark.parametrize("kv_quant", [None, (8, 64), (4, 32)])
@pytest.mark.parametrize("window", [None, 13])
def test_kernels_reference_matches_engine_reference(kv_quant, window):
    hq, hkv, d = 8, 2, 64
    kp, vp = _pools(hkv, d, kv_quant)
    tables = _tables(3, 6)
    lens = [45, 1, 20]
    q = mx.random.normal((3, hq, d))
    ours = paged_attention_decode(q, kp, vp, tables, lens, d ** -0.5, window, kv_quant)
    # the engine's per-sequence path (engine.paged_attention routes decodes to the kernels)
    theirs = _engine_decode(q, kp, vp, tables, lens, d ** -0.5, window, kv_quant)
    assert ours.shape == (3, hq, d)
    assert mx.allclose(ours, theirs, atol=1e-5).item()


def test_empty_context_gives_zeros():
    kp, vp = _pools(2, 64, None)
    q = mx.random.normal((2, 4, 64))
    out = paged_decode_reference(q, kp, vp, _tables(2, 3), [0, 5], 0.125)
    assert mx.all(out[0] == 0).item() and mx.all(mx.isfinite(out)).item()


@pytest.mark.parametrize("kv_quant", [None, (8, 64), (4, 32)])
def test_write_kv_matches_engine_and_round_trips(kv_quant):
    hkv, d = 2, 64
    kp, vp = _pools(hkv, d, kv_quant)
    k = mx.random.normal((5, hkv, d))
    v = mx.random.normal((5, hkv, d))
    slots = mx.array([3, 17, 40, 41, 150], dtype=mx.int32)
    ours = write_kv(kp, vp, k, v, slots, kv_quant)
    theirs = engine_pa.write_kv(kp, vp, k, v, slots, kv_quant)
    for a, b in zip(ours, theirs):
        for x, y in zip(a if kv_quant else (a,), b if kv_quant else (b,)):
            assert mx.array_equal(x, y).item()
    # the written slots hold the new keys (exactly, or to quantization error)
    newk = ours[0]
    if kv_quant is None:
        got = newk.reshape(NB * BS, hkv, d)[slots]
        assert mx.array_equal(got, k).item()
    else:
        bits, g = kv_quant
        flat = [p.reshape(NB * BS, *p.shape[2:])[slots] for p in newk]
        got = mx.dequantize(*flat, group_size=g, bits=bits)
        assert mx.abs(got - k).max().item() < (0.05 if bits == 8 else 0.5)


def test_bad_inputs_name_the_problem():
    kp, vp = _pools(2, 64, None)
    q = mx.random.normal((2, 4, 64))
    with pytest.raises(ValueError, match="kv_quant"):
        paged_attention_decode(q, kp, vp, _tables(2, 3), [3, 5], 0.1, None, (8, 64))
    with pytest.raises(ValueError, match="query heads"):
        paged_attention_decode(mx.zeros((2, 3, 64)), kp, vp, _tables(2, 3), [3, 5], 0.1)
    with pytest.raises(ValueError, match="block_tables"):
        paged_attention_decode(q, kp, vp, _tables(3, 3), [3, 5], 0.1)
    with pytest.raises(ValueError, match="slot_mapping"):
        write_kv(kp, vp, mx.zeros((2, 2, 64)), mx.zeros((2, 2, 64)), mx.array([1, 2, 3]))


def _split_k_like_cuda(q, k, v, lens, scale, window, part):
    """NumPy port of kernels/paged_cuda.py on dense per-sequence K/V [B, L, Hkv, D]."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    span = k.shape[1] if not window else min(k.shape[1], window)
    nparts = max(1, -(-span // part))
    out = np.zeros((b, hq, d))
    for s in range(b):
        ctx = lens[s]
        start = max(0, ctx - window) if window else 0
        for h in range(hq):
            ms, ls, os_ = [], [], []
            for p in range(nparts):
                t0, t1 = start + p * part, min(ctx, start + (p + 1) * part)
                if t0 >= t1:
                    ms.append(-np.inf), ls.append(0.0), os_.append(np.zeros(d))
                    continue
                sc = (k[s, t0:t1, h // g] @ (q[s, h] * scale))
                m = sc.max()
                e = np.exp(sc - m)
                ms.append(m), ls.append(e.sum()), os_.append(e @ v[s, t0:t1, h // g])
            big = max(ms)
            if big == -np.inf:
                continue
            w = [np.exp(m - big) if m != -np.inf else 0.0 for m in ms]
            out[s, h] = sum(wi * o for wi, o in zip(w, os_)) / sum(wi * li for wi, li in zip(w, ls))
    return out


@pytest.mark.parametrize("window", [None, 11])
def test_cuda_split_k_algorithm_in_numpy(window):
    hq, hkv, d = 4, 2, 32
    kp, vp = _pools(hkv, d, None, seed=3)
    tables = _tables(3, 6, seed=4)
    lens = [0, 29, 48]
    q = mx.random.normal((3, hq, d))
    dense_k = kp[tables].reshape(3, 6 * BS, hkv, d)
    dense_v = vp[tables].reshape(3, 6 * BS, hkv, d)
    ours = _split_k_like_cuda(q, dense_k, dense_v, lens, d ** -0.5, window, part=8)
    ref = np.asarray(paged_decode_reference(q, kp, vp, tables, lens, d ** -0.5, window))
    assert np.allclose(ours, ref, atol=1e-4)


def test_cuda_shared_memory_rule():
    assert paged_cuda.pick_part(4, 128, False) == 512
    assert paged_cuda.pick_part(8, 128, True) == 512
    assert paged_cuda.pick_part(8, 256, False) == 128
    assert paged_cuda.pick_part(32, 256, False) is None      # too big: the reference runs
    assert paged_cuda.supports(mx.zeros((1, 32, 128), dtype=mx.bfloat16), 128, 4, 4, 64)
    assert not paged_cuda.supports(mx.zeros((1, 32, 96), dtype=mx.bfloat16), 96, 4, 16, 32)


def test_cuda_parts_shrink_for_small_batches():
    # batch 1, 8 KV heads, 256 tokens: 512-token parts would be 8 blocks; 32-token parts give 64
    assert paged_cuda.occupancy_part(512, 1, 8, 256) == 32
    assert paged_cuda.occupancy_part(512, 4, 8, 2048) == 128     # 4 * 8 * 16 = 512 blocks
    assert paged_cuda.occupancy_part(512, 64, 8, 2048) == 512    # already 2,048 blocks
    assert paged_cuda.occupancy_part(128, 1, 1, 16) == paged_cuda.MIN_PART
    # the split-K merge is exact for any part size: the NumPy port at the smallest part
    rng = np.random.default_rng(5)
    q = rng.standard_normal((2, 4, 16)).astype(np.float32)
    k = rng.standard_normal((2, 200, 2, 16)).astype(np.float32)
    v = rng.standard_normal((2, 200, 2, 16)).astype(np.float32)
    a = _split_k_like_cuda(q, k, v, [200, 77], 0.25, None, part=paged_cuda.MIN_PART)
    b = _split_k_like_cuda(q, k, v, [200, 77], 0.25, None, part=512)
    assert np.allclose(a, b, atol=1e-5)


def test_decode_plan_equals_the_entry_point():
    from jang_serve.kernels.paged import paged_decode_plan

    kp, vp = _pools(2, 64, (8, 64))
    tables, lens = _tables(3, 6), mx.array([45, 1, 20], dtype=mx.int32)
    q1, q2 = mx.random.normal((3, 8, 64)), mx.random.normal((3, 8, 64))
    run = paged_decode_plan(q1, kp, vp, tables, lens, 0.125, 13, (8, 64))
    for q in (q1, q2):  # one plan, several layers
        want = paged_attention_decode(q, kp, vp, tables, lens, 0.125, 13, (8, 64))
        assert mx.allclose(run(q, kp, vp), want, atol=1e-6).item()
    with pytest.raises(ValueError, match="kv_quant"):
        paged_decode_plan(q1, kp, vp, tables, lens, 0.125, None, None)


def test_metal_self_test_failure_falls_back(monkeypatch):
    from jang_serve.kernels import backend, metal_common, paged_metal

    monkeypatch.setattr(metal_common, "_results", {})
    monkeypatch.setattr(backend, "_disabled", set())
    assert paged_metal.ready() is False
    assert ("metal", "paged") in backend.disabled()
    monkeypatch.setattr(backend, "current", lambda: "metal")
    kp, vp = _pools(2, 64, (8, 64))
    q = mx.random.normal((2, 4, 64))
    out = paged_attention_decode(q, kp, vp, _tables(2, 3), [3, 20], 0.125, None, (8, 64))
    ref = paged_decode_reference(q, kp, vp, _tables(2, 3), [3, 20], 0.125, None, (8, 64))
    assert mx.allclose(out, ref).item()


def test_warmup_on_the_reference_backend_and_bad_specs():
    from jang_serve.kernels import warmup

    res = warmup([dict(op="qmm", n=64, k=128, bits=4, group_size=64),
                  dict(op="paged", heads=4, kv_heads=2, head_dim=64, kv_quant=(8, 64))])
    assert res["backend"] == "reference" and res["ops"] == 2 and res["calls"] == 0
    with pytest.raises(ValueError, match="unknown op"):
        warmup([dict(op="conv")])


def _v2_like_cuda(q, k, v, lens, scale, window, part):
    """NumPy port of kernels/paged_v2_cuda.py on dense per-sequence K/V [B, L, Hkv, D]: per warp an online
    softmax over its token rows, iteration by iteration; warps merged; then the parts merged."""
    from jang_serve.kernels import paged_v2_cuda as v2

    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, hq, d = q.shape
    hkv, g = k.shape[2], hq // k.shape[2]
    nwarp, tpw = v2.THREADS // 32, 32 // (d // 8)
    wt = tpw * (4 if g <= 4 else 2)
    bt = nwarp * wt
    out = np.zeros((b, hq, d))

    def merge(ms, ls, os_):
        big = max(ms)
        w = [0.0 if m == -np.inf else np.exp(m - big) for m in ms]
        return big, sum(wi * li for wi, li in zip(w, ls)), sum(wi * o for wi, o in zip(w, os_))

    for s in range(b):
        ctx = lens[s]
        start = max(0, ctx - window) if window else 0
        end = min(ctx, k.shape[1])
        nact = -(-(end - start) // part) if end > start else 0
        for h in range(hq):
            qs = q[s, h] * scale
            parts = []
            for p in range(nact):
                t0 = start + p * part
                n = min(part, end - t0)
                warps = []
                for w in range(nwarp):
                    m, l, o = -np.inf, 0.0, np.zeros(d)
                    for it in range(-(-n // bt)):
                        idx = [i for i in range(it * bt + w * wt, it * bt + (w + 1) * wt) if i < n]
                        sc = k[s, [t0 + i for i in idx], h // g] @ qs if idx else np.zeros(0)
                        mn = max([m, *sc])
                        alpha = 0.0 if m == -np.inf else np.exp(m - mn)
                        e = np.exp(sc - mn) if idx else np.zeros(0)
                        l = l * alpha + e.sum()
                        o = o * alpha + (e @ v[s, [t0 + i for i in idx], h // g] if idx else 0.0)
                        m = mn
                    warps.append((m, l, o))
                parts.append(merge(*zip(*warps)))
            if parts:
                _, big_l, big_o = merge(*zip(*parts))
                out[s, h] = big_o / big_l
    return out


@pytest.mark.parametrize("d,part,window", [(64, 32, None), (64, 128, None), (32, 64, 50), (256, 32, None)])
def test_cuda_v2_one_launch_algorithm_in_numpy(d, part, window):
    # parts with empty warps (32 tokens, 4 warps of 16 rows at D 64), several iterations per warp, a window
    hq, hkv = 8, 2
    kp, vp = _pools(hkv, d, None, seed=6)
    tables = mx.array(np.random.default_rng(7).integers(0, NB, (3, 40)).astype(np.int32))  # blocks may repeat
    lens = [0, 150, 319]
    q = mx.random.normal((3, hq, d), key=mx.random.key(8))
    dense_k = kp[tables].reshape(3, 40 * BS, hkv, d)
    dense_v = vp[tables].reshape(3, 40 * BS, hkv, d)
    ours = _v2_like_cuda(q, dense_k, dense_v, lens, d ** -0.5, window, part)
    ref = np.asarray(paged_decode_reference(q, kp, vp, tables, lens, d ** -0.5, window))
    assert np.allclose(ours, ref, atol=1e-4)


def test_cuda_v2_parts_and_counters(monkeypatch):
    from jang_serve.kernels import paged_v2_cuda as v2

    monkeypatch.setattr(paged_cuda, "V2_MODE", "auto")
    # the largest part always (measured: fewer, longer parts beat more blocks, the merge costs more)
    assert v2.pick_part(1, 8, 160) == v2.pick_part(1, 8, 4096) == v2.pick_part(64, 8, 2048) == 512
    assert v2.pick_part(1, 8, 1 << 20, max_part=128) == 128
    # routing: v2 for float KV, v1 for q8/q4 and for G > 8; JANG_PAGED_V2 forces either
    assert paged_cuda._use_v2(128, 4, 16, None) and not paged_cuda._use_v2(128, 4, 8, None)
    assert not paged_cuda._use_v2(128, 12, 16, None) and paged_cuda._use_v2(128, 4, 4, "v2")
    assert not paged_cuda._use_v2(128, 4, 16, "v1")
    with pytest.raises(ValueError, match="G <= 8"):
        paged_cuda._use_v2(128, 12, 16, "v2")
    assert v2.supports(128, 8) and v2.supports(64, 1) and not v2.supports(128, 12) and not v2.supports(96, 4)
    v2.counters(10)
    start = v2._ring[0]
    ring = [v2.counters(10) for _ in range(v2.RING)]
    assert all(c.dtype == mx.int32 and c.size >= 10 and int(c.sum().item()) == 0 for c in ring)
    assert len({id(c) for c in ring}) == v2.RING   # consecutive launches: distinct buffers
    assert v2._ring[0] == start and v2.counters(3) is ring[0]   # the ring comes round, any smaller size
    big = v2.counters(ring[0].size + 1)            # outgrown: a new ring, larger
    assert big.size > ring[0].size and int(big.sum().item()) == 0


def test_metal_port_shape_rule():
    from jang_serve.kernels import paged_metal

    q = mx.zeros((1, 32, 128), dtype=mx.float16)
    assert paged_metal.supports(q, 128, 4, 16, 32) and paged_metal.supports(q, 128, 8, 8, 64)
    assert not paged_metal.supports(q, 256, 8, 16, 32)     # 35 KB of threadgroup memory > 32 KB
    assert not paged_metal.supports(q, 128, 12, 16, 32)    # G > 8: the reference
