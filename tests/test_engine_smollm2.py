"""Acceptance on the real SmolLM2-135M (float32 on CPU): quantized KV barely moves perplexity on
the Python docs text, and the engine's greedy output equals the plain model's."""

import math

import mlx.core as mx
import pytest

import realdata
from engine_helpers import reference_greedy
from jang_serve.engine.engine_config import EngineConfig
from jang_serve.engine.engine_core import EngineCore
from jang_serve.engine.kv_pool import KVPool
from jang_serve.engine.loader import load_model
from jang_serve.engine.paged_attention import PagedBackend
from jang_serve.engine.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def smollm2():
    return load_model(realdata.smollm2_gguf())


def _text_ids(tok, n):
    text = realdata.python_docs_text()
    start = text.index("The Python Tutorial")
    return tok.encode(text[start:start + 8 * n])[:n]


def perplexity(model, ids: list[int], kv_dtype: str, chunk: int, tokenizer=None, **kw) -> float:
    """Perplexity of ids through the paged KV pool, prefilled in chunks (later chunks read the
    earlier chunks' K/V back from the possibly quantized pool). With a tokenizer the q4 pool
    calibrates its key means and scales (engine/kv_calibration.py), as the engine's pool does."""
    cfg = EngineConfig(num_blocks=-(-len(ids) // 16), kv_dtype=kv_dtype, **kw)
    pool = KVPool.for_model(model, cfg, mx.float32, tokenizer)
    table = list(range(pool.num_blocks))
    nll = 0.0
    for s in range(0, len(ids), chunk):
        e = min(s + chunk, len(ids))
        slots = mx.array([table[p // 16] * 16 + p % 16 for p in range(s, e)])
        be = PagedBackend(pool, slots, mx.array([table]), [e - s], [e])
        logits = model(mx.array(ids[s:e]), mx.arange(s, e), be).astype(mx.float32)
        lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        tgt = mx.array(ids[s + 1:e + 1])
        rows = lp[: tgt.shape[0]]
        nll -= mx.take_along_axis(rows, tgt[:, None], axis=-1).sum().item()
    return math.exp(nll / (len(ids) - 1))


def _kv_ppl_check(lm, n, chunk):
    ids = _text_ids(lm.tokenizer, n)
    base = perplexity(lm.model, ids, "auto", chunk)
    q8 = perplexity(lm.model, ids, "q8", chunk)
    q4 = perplexity(lm.model, ids, "q4", chunk, lm.tokenizer)
    assert 1 < base < 100, base
    assert abs(q8 / base - 1) <= 0.005, (base, q8)
    assert abs(q4 / base - 1) <= 0.03, (base, q4)
    return base, q8, q4


def test_kv_q8_q4_perplexity(smollm2):
    # 512 tokens in two 256-token chunks: every query reads all keys/values back from the pool
    # (bench/kv_quality.py measures 4,096 tokens in 512- and 2,048-token windows).
    print(_kv_ppl_check(smollm2, 512, 256))


@pytest.mark.slow
def test_kv_q8_q4_perplexity_2048(smollm2):
    print(_kv_ppl_check(smollm2, 2048, 512))


@pytest.mark.slow
def test_engine_greedy_equals_plain_model(smollm2):
    model, tok = smollm2.model, smollm2.tokenizer
    prompts = [tok.encode(t) for t in ("The capital of France is", "def fibonacci(n):", "1, 2, 3,")]
    core = EngineCore(smollm2, EngineConfig(num_blocks=16, max_num_batched_tokens=8))
    outs = core.generate(prompts, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    assert outs == [reference_greedy(model, p, 4) for p in prompts]


@pytest.mark.slow
def test_smollm2_json_outputs_parse(smollm2):
    import json

    import jsonschema

    tok = smollm2.tokenizer
    ask = tok.apply_chat_template([{"role": "user", "content": "Describe a cat as JSON."}])
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                               "color": {"enum": ["black", "white", "orange"]}},
              "required": ["name", "age", "color"], "additionalProperties": False}
    core = EngineCore(smollm2, EngineConfig(num_blocks=64))
    ids = tok.encode(ask)
    core.add_request("obj", ids, SamplingParams(max_tokens=80, temperature=0,
                                                response_format={"type": "json_object"}))
    core.add_request("sch", ids, SamplingParams(max_tokens=80, temperature=0, response_format={
        "type": "json_schema", "json_schema": {"name": "cat", "schema": schema}}))
    text, fin = {}, {}
    while core.has_work():
        for d in core.step():
            text[d.request_id] = text.get(d.request_id, "") + d.text
            fin[d.request_id] = d.finish_reason
    assert fin == {"obj": "stop", "sch": "stop"}, text
    assert isinstance(json.loads(text["obj"]), dict)
    jsonschema.validate(json.loads(text["sch"]), schema)
