"""json_schema / json_object output through llguidance over the real SmolLM2 tokenizer, and stop
strings through the incremental detokenizer. A tiny random model with SmolLM2's vocabulary makes
the choices (the grammar, not the model, must make the output valid)."""

import json

import jsonschema
import mlx.core as mx
import pytest

import realdata
from engine_helpers import tiny_model
from jang_serve.engine.engine_config import EngineConfig
from jang_serve.engine.engine_core import EngineCore
from jang_serve.engine.grammar import GrammarError
from jang_serve.engine.loader.gguf import read_gguf
from jang_serve.engine.sampling_params import SamplingParams

S = {"type": "string", "maxLength": 6}
I = {"type": "integer", "minimum": -50, "maximum": 500}
N = {"type": "number", "minimum": -10, "maximum": 10}


def obj(props, required=None):
    return {"type": "object", "properties": props, "required": required if required is not None else list(props),
            "additionalProperties": False}


SCHEMAS = [
    obj({"name": S, "age": I}),
    obj({"x": N, "y": N}),
    obj({"color": {"enum": ["red", "green", "blue"]}}),
    obj({"ok": {"type": "boolean"}, "count": I}),
    obj({"tags": {"type": "array", "items": S, "maxItems": 3}}),
    obj({"point": obj({"x": I, "y": I})}),
    obj({"matrix": {"type": "array", "items": {"type": "array", "items": I, "maxItems": 2}, "maxItems": 2}}),
    {"type": "array", "items": I, "minItems": 1, "maxItems": 4},
    {"enum": ["yes", "no", 3, None]},
    obj({"a": obj({"b": obj({"c": {"enum": [1, 2, 3]}})})}),
    obj({"status": {"enum": ["open", "closed"]}, "score": N, "id": I}),
    obj({"items": {"type": "array", "items": obj({"sku": S, "qty": I}), "minItems": 1, "maxItems": 2}}),
    obj({"maybe": {"anyOf": [I, {"type": "null"}]}}),
    obj({"name": S, "nick": S}, required=["name"]),
    {"type": "integer", "minimum": 0, "maximum": 9999},
    obj({"pair": {"type": "array", "prefixItems": [S, I], "items": False, "minItems": 2}}),
    obj({"flags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 5}, "ratio": N}),
    obj({"user": obj({"name": S, "roles": {"type": "array", "items": {"enum": ["admin", "dev"]},
                                           "maxItems": 2}}), "active": {"type": "boolean"}}),
    obj({"const": {"const": "fixed"}, "n": I}),
    obj({"temps": {"type": "array", "items": N, "minItems": 2, "maxItems": 3}, "unit": {"enum": ["C", "F"]}}),
]


@pytest.fixture(scope="module")
def engine_parts():
    tok = read_gguf(realdata.smollm2_gguf(), with_weights=False).tokenizer
    model, cfg = tiny_model(seed=5, vocab_size=49152, hidden_size=32, num_attention_heads=2,
                            num_key_value_heads=1)
    model.update({"lm_head": {"weight": model.lm_head.weight / 8}})
    mx.eval(model.parameters())
    cfg["eos_token_id"] = sorted(tok.eos_token_ids)
    return model, tok, cfg


def _run(core, reqs):
    for rid, (p, sp) in reqs.items():
        core.add_request(rid, p, sp)
    text, last = {}, {}
    while core.has_work():
        for d in core.step():
            text[d.request_id] = text.get(d.request_id, "") + d.text
            last[d.request_id] = d
    return text, last


def test_json_schema_outputs_validate(engine_parts):
    model, tok, cfg = engine_parts
    core = EngineCore((model, tok, cfg), EngineConfig(num_blocks=512))
    prompt = tok.encode("Answer in JSON:")
    reqs = {}
    for i, schema in enumerate(SCHEMAS):
        rf = {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema}}
        sp = SamplingParams(max_tokens=150, temperature=0 if i % 2 else 1.0, seed=i, response_format=rf)
        reqs[f"r{i}"] = (prompt, sp)
    text, last = _run(core, reqs)
    for i, schema in enumerate(SCHEMAS):
        d = last[f"r{i}"]
        assert d.finish_reason == "stop", (i, text[f"r{i}"])
        jsonschema.validate(json.loads(text[f"r{i}"]), schema)
    assert core.blocks.num_used == 0


def test_unconstrained_output_is_not_json(engine_parts):
    """The same model without a grammar does not produce valid JSON (so the grammar does the work)."""
    model, tok, cfg = engine_parts
    core = EngineCore((model, tok, cfg), EngineConfig(num_blocks=64))
    text, _ = _run(core, {"u": (tok.encode("Answer in JSON:"), SamplingParams(max_tokens=20, temperature=0))})
    with pytest.raises(json.JSONDecodeError):
        json.loads(text["u"])


def test_bad_schema_is_a_clear_error(engine_parts):
    model, tok, cfg = engine_parts
    core = EngineCore((model, tok, cfg), EngineConfig(num_blocks=16))
    with pytest.raises(GrammarError, match="schema"):
        core.add_request("b", [1, 2], SamplingParams(response_format={"type": "json_schema", "json_schema": {}}))
    with pytest.raises(GrammarError, match="bad JSON schema"):
        core.add_request("b", [1, 2], SamplingParams(response_format={
            "type": "json_schema", "json_schema": {"schema": {"type": "no-such-type"}}}))


def test_stop_strings_cut_the_text(engine_parts):
    model, tok, cfg = engine_parts
    prompt = tok.encode("Once upon a time")
    greedy = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    text, _ = _run(EngineCore((model, tok, cfg), EngineConfig(num_blocks=64)), {"a": (prompt, greedy)})
    full = text["a"]
    assert len(full) > 20
    stop = full[10:14]
    cut = full[:full.index(stop)]
    sp = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=[stop, "\x00never"])
    text, last = _run(EngineCore((model, tok, cfg), EngineConfig(num_blocks=64)), {"b": (prompt, sp)})
    assert text["b"] == cut
    assert last["b"].finish_reason == "stop"
    assert last["b"].completion_tokens < 24
