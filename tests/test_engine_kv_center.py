"""Quantized KV centred on calibration means (engine/kv_calibration.py + engine/kv_transform.py):
the change is exact, the means come from a real forward pass, and they shrink the q4 error."""

import mlx.core as mx
import numpy as np
import pytest

import realdata
from engine_helpers import tiny_model
from jang_serve.engine.attention import ContiguousBackend, ContiguousKV, attend_one
from jang_serve.engine.engine_config import EngineConfig
from jang_serve.engine.kv_calibration import CALIBRATION_TEXT, calibration_ids, calibration_positions, kv_means, kv_stats
from jang_serve.engine.kv_pool import KVPool
from jang_serve.engine.kv_transform import KVTransform
from jang_serve.engine.loader import load_model


@pytest.fixture(scope="module")
def smollm2():
    return load_model(realdata.smollm2_gguf())


@pytest.mark.parametrize("window", [None, 5])
def test_centred_transform_is_exact(window):
    """Keys and values shifted by means (plus the smoothing scales and rotation) give the same
    attention output: a per-query constant under softmax, and weights that sum to one."""
    model, _ = tiny_model(num_attention_heads=4, num_key_value_heads=2, hidden_size=128)  # head_dim 32
    rng = np.random.default_rng(0)
    stats = {name: [rng.normal(size=(2, 32)).astype(np.float32) * 3 for _ in range(2)] for name in ("k_mean", "v_mean")}
    stats.update({name: [np.abs(rng.normal(size=(2, 32))).astype(np.float32) + 0.1 for _ in range(2)]
                  for name in ("k_rms", "q_rms")})
    tf = KVTransform(model, mx.float32, stats, center="kv")
    assert all(c is not None for c in tf.v_mean)
    mx.random.seed(3)
    q, k, v = mx.random.normal((9, 4, 32)), mx.random.normal((9, 2, 32)) + 2, mx.random.normal((9, 2, 32)) - 1
    ref = attend_one(q, k, v, 0.2, window)
    out = tf.output(1, attend_one(tf.queries(1, q), tf.keys(1, k), tf.values(1, v), 0.2, window))
    assert mx.allclose(out, ref, atol=1e-4).item()
    stored = tf.keys(1, k) @ tf.h * tf.k_scale[1]  # back out of the rotation and smoothing: k - c
    assert mx.allclose(stored, k - mx.array(stats["k_mean"][1]), atol=1e-4).item()


def test_calibration_stats_of_smollm2(smollm2):
    """One pass over the built-in text (not the evaluation text), in 8 pieces spread over the first
    4,096 positions: per layer [Hkv, D] statistics, the same on every call; the key means hold large
    per-channel offsets next to the spread of the keys (what centring removes)."""
    ids = calibration_ids(smollm2.tokenizer)
    assert len(ids) == 512 and "Python Tutorial" not in CALIBRATION_TEXT
    pos = calibration_positions(smollm2.model)
    assert len(pos) == 512 and pos[:2] == [0, 1] and pos[64] > 500 and pos[-1] == 4095
    st = kv_stats(smollm2.model, smollm2.tokenizer)
    assert set(st) == {"k_mean", "v_mean", "k_rms", "q_rms"}
    assert all(len(v) == 30 and all(a.shape == (3, 64) and a.dtype == np.float32 for a in v) for v in st.values())
    assert all((a > 0).all() for a in st["k_rms"] + st["q_rms"])
    km, _ = kv_means(smollm2.model, smollm2.tokenizer)
    assert all(np.array_equal(a, b) for a, b in zip(km, st["k_mean"]))
    ratio = max(float((np.abs(m) / r).max()) for m, r in zip(st["k_mean"], st["k_rms"]))
    assert ratio > 3, ratio  # some channel's mean is several times its spread


def test_pool_centres_keys_by_default_for_q4_only(smollm2):
    cfg = EngineConfig(num_blocks=4, kv_dtype="q4")
    assert cfg.kv_center == "k"
    pool = KVPool.for_model(smollm2.model, cfg, mx.float32, smollm2.tokenizer)
    assert all(c is not None for c in pool.transform.k_mean) and all(c is None for c in pool.transform.v_mean)
    both = KVPool.for_model(smollm2.model, EngineConfig(num_blocks=4, kv_dtype="q4", kv_center="kv"), mx.float32,
                            smollm2.tokenizer)
    assert all(c is not None for c in both.transform.v_mean)
    no_tok = KVPool.for_model(smollm2.model, cfg, mx.float32)  # no tokenizer: no calibration text
    assert all(c is None for c in no_tok.transform.k_mean)
    assert KVPool.for_model(smollm2.model, EngineConfig(num_blocks=4), mx.float32, smollm2.tokenizer).transform is None
    with pytest.raises(ValueError, match="kv_center"):
        EngineConfig(kv_dtype="q4", kv_center="values")


def test_calibration_shrinks_q4_score_error(smollm2):
    """SmolLM2's queries and keys on real text (the Python docs, not the calibration text): the
    attention scores recomputed from q4 keys stored in the calibrated basis (centred, measured
    scales) are closer to the exact scores than with the weights' estimate alone (and both beat
    the plain basis). The error is q·(k̂ - k) over all query/key pairs of every layer."""
    tok = smollm2.tokenizer
    text = realdata.python_docs_text()
    ids = tok.encode(text[text.index("The Python Tutorial"):][:4000])[:256]
    rec = {}

    class Recorder(ContiguousBackend):
        def attend(self, layer, q, k, v, *, scale, window=None):
            rec[layer] = (q, k)
            return super().attend(layer, q, k, v, scale=scale, window=window)

    be = Recorder([ContiguousKV(smollm2.model.num_layers)], [len(ids)])
    mx.eval(smollm2.model(mx.array(ids), mx.arange(len(ids)), be, logits_rows=mx.array([0])), list(rec.values()))

    def q4(x):  # the pool's rounding: group 32, float16 scales and biases
        w, s, b = mx.quantize(x, group_size=32, bits=4)
        return mx.dequantize(w, s.astype(mx.float16).astype(mx.float32), b.astype(mx.float16).astype(mx.float32),
                             group_size=32, bits=4)

    def score_error(tf) -> float:
        errs = []
        for layer, (q, k) in rec.items():
            if tf is not None:
                q, k = tf.queries(layer, q), tf.keys(layer, k)
            hkv = k.shape[1]
            qh = q.reshape(q.shape[0], hkv, -1, q.shape[2]).transpose(1, 2, 0, 3)  # [Hkv, group, T, D]
            e = qh @ (q4(k) - k).transpose(1, 2, 0)[:, None]
            errs.append(mx.sqrt(mx.mean(e * e)).item())
        return float(np.mean(errs))

    plain = score_error(None)
    weights = score_error(KVTransform(smollm2.model))
    calibrated = score_error(KVTransform(smollm2.model, mx.float32, kv_stats(smollm2.model, tok)))
    print(plain, weights, calibrated)
    assert weights < 0.8 * plain
    assert calibrated < 0.9 * weights
