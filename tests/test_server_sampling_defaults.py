"""Sampling defaults: fields a request leaves out come from the model's generation_config.json (or a
GGUF's general.sampling.* keys), else OpenAI's defaults; /v1/models shows them. Real uvicorn servers
on the tiny real model, driven by the openai client."""

from __future__ import annotations

import json
import shutil

import openai
import pytest

from jang_serve.server.default_model import RECOMMENDED_SAMPLING, default_gguf, write_sampling_defaults
from jang_serve.server.sampling_defaults import OPENAI_DEFAULTS, sampling_defaults
from serve_helpers import shared_jang_serve, start_jang_serve, tiny_model_dir

PROMPT = "The os module provides"
SEEDS = [1, 2, 3, 4, 5, 6]


@pytest.fixture(scope="module")
def topk1_server(tmp_path_factory):
    """The tiny model whose generation_config.json says temperature 1.3, top_k 1 (greedy in effect)."""
    model = tmp_path_factory.mktemp("gen") / "tiny-topk1"
    shutil.copytree(tiny_model_dir(), model)
    gen = json.loads((model / "generation_config.json").read_text())
    gen.update(temperature=1.3, top_k=1, top_p="not a number")  # the invalid value is ignored
    (model / "generation_config.json").write_text(json.dumps(gen))
    srv = start_jang_serve(model, "--max-model-len", "256")
    yield srv
    srv.stop()


def _client(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=60)


def _texts(client, model, **kw) -> list[str]:
    return [client.completions.create(model=model, prompt=PROMPT, max_tokens=12, seed=s, **kw).choices[0].text
            for s in SEEDS]


def test_generation_config_defaults_apply_and_show(topk1_server):
    client = _client(topk1_server)
    card = client.models.list().data[0].model_dump()
    sd = card["sampling_defaults"]
    assert sd["source"] == "generation_config.json"
    assert sd["values"] == {**OPENAI_DEFAULTS, "temperature": 1.3, "top_k": 1}
    assert sd["from_model"] == ["temperature", "top_k"]
    assert client.models.retrieve(card["id"]).model_dump()["sampling_defaults"] == sd
    greedy = client.completions.create(model=card["id"], prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
    # temperature and top_k left out: the model's top_k 1 makes every seed give the greedy text
    assert _texts(client, card["id"]) == [greedy] * len(SEEDS)
    # a request's own value wins over the model's: top_k 0 with a hot temperature samples
    assert len(set(_texts(client, card["id"], temperature=2.0, extra_body={"top_k": 0}))) > 1
    # chat uses the same defaults
    msgs = [{"role": "user", "content": PROMPT}]
    g = client.chat.completions.create(model=card["id"], messages=msgs, max_tokens=8, temperature=0)
    d = [client.chat.completions.create(model=card["id"], messages=msgs, max_tokens=8, seed=s) for s in SEEDS[:3]]
    assert {c.choices[0].message.content for c in d} == {g.choices[0].message.content}


def test_without_model_values_openai_defaults_apply():
    srv = shared_jang_serve()  # the tiny model's generation_config.json names only eos ids
    client = _client(srv)
    card = client.models.list().data[0].model_dump()
    assert card["sampling_defaults"] == {"values": OPENAI_DEFAULTS, "source": "openai", "from_model": []}
    # left out == OpenAI's temperature 1.0, seed by seed; and not greedy
    omitted = _texts(client, card["id"])
    assert omitted == _texts(client, card["id"], temperature=1.0, top_p=1.0)
    greedy = client.completions.create(model=card["id"], prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
    assert any(t != greedy for t in omitted)


def test_sampling_defaults_files(tmp_path):
    # a folder without generation_config.json
    assert sampling_defaults(tmp_path) == {"values": OPENAI_DEFAULTS, "source": "openai", "from_model": []}
    # a GGUF with general.sampling.* keys (metadata only, written with the gguf library)
    import gguf

    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_float32("general.sampling.temp", 0.7)
    w.add_int32("general.sampling.top_k", 40)
    w.add_float32("general.sampling.penalty_repeat", 1.1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    sd = sampling_defaults(path)
    assert sd["source"] == "gguf general.sampling"
    assert sd["values"]["top_k"] == 40 and sd["values"]["top_p"] == 1.0
    assert sd["values"]["temperature"] == pytest.approx(0.7) and sd["values"]["repetition_penalty"] == pytest.approx(1.1)
    # the default bundle: SmolLM2's GGUF has no sampling keys -> the model card's values, eos ids kept
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2], "bos_token_id": 1}))
    gen = write_sampling_defaults(bundle, default_gguf())
    assert gen == {"eos_token_id": [0, 2], "bos_token_id": 1, **RECOMMENDED_SAMPLING}
    assert sampling_defaults(bundle)["values"] == {**OPENAI_DEFAULTS, "temperature": 0.2, "top_p": 0.9}
