"""Dense weights on the CPU (engine/models/dense.py): quantized linears and embeddings become dense
copies of exactly their dequantized values, within the GB budget only, and the engine's greedy
tokens stay those of the packed model."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from engine_helpers import tiny_model
from jang_serve.engine.distributed.sharding import AllSumLinear, AllSumQLinear
from jang_serve.engine.engine_config import EngineConfig
from jang_serve.engine.engine_core import EngineCore
from jang_serve.engine.models.dense import dense_bytes, densify
from jang_serve.engine.models.layers import QLinear, quantize_model
from jang_serve.engine.sampling_params import SamplingParams

PROMPTS = [[5, 9, 3, 17, 4], [200, 1, 42], [7] * 12]


def quantized_tiny(seed=0, **kw):
    model, cfg = tiny_model(seed, **kw)
    quantize_model(model, lambda path, m: (8, 32) if "embed" in path else (4, 32))
    mx.eval(model.parameters())
    return model, cfg


def kinds(model) -> dict[str, int]:
    out: dict[str, int] = {}
    for _, m in model.named_modules():
        out[type(m).__name__] = out.get(type(m).__name__, 0) + 1
    return out


def generate(model, cfg, gb):
    core = EngineCore((model, None, cfg), EngineConfig(num_blocks=64, cpu_dense_gb=gb))
    out = core.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    return core, out


def test_dense_weights_are_the_dequantized_ones_and_tokens_are_unchanged():
    packed, cfg = quantized_tiny(tie_word_embeddings=True)
    before = kinds(packed)
    assert before["QLinear"] == 14 and before["QuantizedEmbedding"] == 1
    want = {p: mx.dequantize(m.weight, m.scales, m.biases, group_size=m.group_size, bits=m.bits)
            for p, m in packed.named_modules() if isinstance(m, (QLinear, nn.QuantizedEmbedding))}
    core0, ref = generate(packed, cfg, 0)
    assert core0.dense is None and kinds(packed)["QLinear"] == 14  # 0: stays packed

    model, _ = quantized_tiny(tie_word_embeddings=True)
    need = dense_bytes(model, mx.float32)
    core, out = generate(model, cfg, None)  # the CPU default budget
    assert core.dense == {"modules": 15, "bytes": need, "dtype": "float32"}
    after = kinds(model)
    assert "QLinear" not in after and "QuantizedEmbedding" not in after
    assert after["Linear"] == 14 and after["Embedding"] == 1
    got = dict(model.named_modules())
    for p, w in want.items():
        assert np.array_equal(np.array(got[p].weight), np.array(w)), p
    assert need == sum(w.size for w in want.values()) * 4
    assert out == ref


def test_over_the_budget_nothing_changes():
    model, cfg = quantized_tiny()
    need = dense_bytes(model, mx.float32)
    assert densify(model, mx.float32, max_gb=need / 1e9 * 0.99) is None
    assert densify(model, mx.float32, max_gb=1.0, available=2 * need - 1) is None  # at most half the free memory
    assert kinds(model)["QLinear"] == 15  # 14 + the untied lm_head
    assert densify(model, mx.float32, max_gb=need / 1e9, available=2 * need)["modules"] == 16
    assert "QLinear" not in kinds(model)


def test_a_row_parallel_shard_keeps_its_all_sum_and_bias():
    mx.random.seed(3)
    lin = nn.Linear(64, 32)
    q = QLinear.from_linear(lin, 4, 32)
    shard = AllSumQLinear(64, 32, False, 4, 32)
    shard.weight, shard.scales, shard.biases = q.weight, q.scales, q.biases
    shard.sum_bias, shard.group = lin.bias, None
    holder = nn.Module()
    holder.proj = shard
    assert densify(holder, mx.float32, 1.0)["modules"] == 1
    twin = holder.proj
    assert type(twin) is AllSumLinear and np.array_equal(np.array(twin.sum_bias), np.array(lin.bias))
    x = mx.random.normal((3, 64))
    assert np.allclose(np.array(twin(x)), np.array(shard(x)), atol=1e-4)
