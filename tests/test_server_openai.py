"""The OpenAI-compatible API through the real `openai` SDK (sync and async) against the real CLI
server serving the embedded SmolLM2-135M-Instruct (see test_server_harness.py)."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import jsonschema
import openai
import pytest

from jang_serve.server.default_model import DEFAULT_MODEL_NAME
from test_server_harness import API_KEY, auth, smollm2_server

MODEL = DEFAULT_MODEL_NAME
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                       "required": ["city"], "additionalProperties": False},
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {"name": "get_time",
                 "parameters": {"type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
                                "required": ["zone"], "additionalProperties": False}},
}


@pytest.fixture(scope="module")
def server():
    return smollm2_server()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=120)


def sse_lines(server, path: str, body: dict) -> list[str]:
    with httpx.stream("POST", server.url + path, json=body, headers=auth(), timeout=120) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return [line for line in r.iter_lines() if line]


def test_health_was_503_while_loading_then_200(server):
    assert 503 in server.health_codes and server.health_codes[-1] == 200
    r = httpx.get(server.url + "/health")
    assert r.status_code == 200 and r.json()["models"][MODEL]["state"] == "ready"


def test_models_list_and_card(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == [MODEL]
    card = client.models.retrieve(MODEL)
    assert card.id == MODEL and card.model_extra["context_length"] > 1000
    # on the CPU the default bundle's quantized layers run from dense float32 copies (engine/models/dense.py)
    dense = card.model_extra["quantization"]["cpu_dense"]
    assert dense["dtype"] == "float32" and dense["modules"] == 211 and 4e8 < dense["bytes"] < 6e8
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("no-such-model")
    assert e.value.body["code"] == "model_not_found"


def test_chat_answers_paris(client):
    r = client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=12, temperature=0)
    choice = r.choices[0]
    assert "Paris" in choice.message.content
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 5 and 0 < r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")


def test_chat_stream_matches_plain_and_has_spec_shape(client, server):
    plain = client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=5, temperature=0)
    lines = sse_lines(server, "/v1/chat/completions", {
        "model": MODEL, "messages": FRANCE, "max_tokens": 5, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True}})
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    with_choices = [c for c in chunks if c["choices"]]
    finishes = [c["choices"][0]["finish_reason"] for c in with_choices]
    assert finishes[-1] == plain.choices[0].finish_reason and not any(finishes[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == plain.usage.completion_tokens
    assert all(c["usage"] is None for c in chunks[:-1])
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in with_choices)
    assert text == plain.choices[0].message.content


def test_keepalive_comments_while_streaming(server):
    # the test server sends an SSE comment whenever a stream is idle for 0.05 s (e.g. during prefill)
    lines = sse_lines(server, "/v1/chat/completions", {
        "model": MODEL, "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 2,
        "stream": True})
    assert any(x.startswith(": ping") for x in lines), lines[:5]
    assert lines[-1] == "data: [DONE]"


def test_completions_plain_stream_and_echo(client):
    prompt = "The capital of France is"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text and r.usage.completion_tokens <= 4
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=4, temperature=0, stream=True) if c.choices)
    assert streamed == r.choices[0].text
    echoed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0, echo=True)
    assert echoed.choices[0].text == prompt + r.choices[0].text


def test_n2_and_seed_reproducibility(client):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Name a color."}], max_tokens=5, temperature=1.0,
              n=2, seed=1234)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert all(c.message.content for c in a.choices)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert 2 <= a.usage.completion_tokens <= 10


def test_stop_sequence(client):
    prompt = "1, 2, 3, 4,"
    full = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 2]  # a string from the middle of the greedy output
    assert stop.strip(), full
    cut = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full[:full.index(stop)]


def test_logprobs_chat_and_completions(client):
    r = client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=4, temperature=0, logprobs=True,
                                       top_logprobs=3)
    items = r.choices[0].logprobs.content
    assert len(items) == r.usage.completion_tokens
    for it in items:
        assert it.logprob <= 0 and len(it.top_logprobs) == 3
        assert it.top_logprobs[0].logprob >= it.top_logprobs[1].logprob >= it.top_logprobs[2].logprob
        assert it.token == it.top_logprobs[0].token  # greedy picks the most likely token
    assert "".join(it.token for it in items) == r.choices[0].message.content
    c = client.completions.create(model=MODEL, prompt="Hello", max_tokens=3, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == c.usage.completion_tokens
    assert all(len(t) <= 2 for t in lp.top_logprobs) and all(v <= 0 for v in lp.token_logprobs)


def test_tool_call_named_not_streamed(client):
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What's the weather in Paris?"}], max_tokens=30,
        tools=[WEATHER_TOOL, TIME_TOOL], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_TOOL["function"]["parameters"])


def test_tool_call_required_streamed(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What time is it in Berlin?"}], max_tokens=40,
        tools=[WEATHER_TOOL, TIME_TOOL], tool_choice="required", stream=True)
    frags, finish = [], None
    for chunk in stream:
        for c in chunk.choices:
            frags += c.delta.tool_calls or []
            finish = c.finish_reason or finish
    assert finish == "tool_calls" and len(frags) >= 2
    assert all(f.index == 0 and f.id == frags[0].id and f.id.startswith("call_") for f in frags)
    name = frags[0].function.name
    assert name in ("get_weather", "get_time")
    args = json.loads("".join(f.function.arguments or "" for f in frags))
    tool = WEATHER_TOOL if name == "get_weather" else TIME_TOOL
    jsonschema.validate(args, tool["function"]["parameters"])


def test_json_schema_output_validates(client):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"], "additionalProperties": False}
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Invent a person. Reply in JSON."}], max_tokens=40,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}})
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)


def test_responses_api_plain_and_streamed(client):
    r = client.responses.create(model=MODEL, input="Say hello.", max_output_tokens=5, temperature=0)
    assert r.object == "response" and r.output_text and r.usage.output_tokens <= 5
    kinds, text = [], []
    for ev in client.responses.create(model=MODEL, input="Say hello.", max_output_tokens=5, temperature=0,
                                      stream=True):
        kinds.append(ev.type)
        if ev.type == "response.output_text.delta":
            text.append(ev.delta)
    assert kinds[0] == "response.created" and kinds[-1] in ("response.completed", "response.incomplete")
    assert "".join(text) == r.output_text


def test_async_client_concurrent(server):
    async def run():
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=120)
        prompts = ["Hi!", "What is 2+2?"]
        plain = await asyncio.gather(*[client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": p}], max_tokens=5, temperature=0) for p in prompts])
        stream = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompts[1]}],
                                                      max_tokens=5, temperature=0, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        await client.close()
        return plain, text

    plain, text = asyncio.run(run())
    assert all(r.choices[0].message.content for r in plain)
    assert text == plain[1].choices[0].message.content  # batching does not change greedy output


def _running(server) -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith("jang_requests_running{"):
            return float(line.rsplit(" ", 1)[1])
    return -1.0


def _wait_idle(server, timeout=10.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if _running(server) == 0:
            return True
        time.sleep(0.1)
    return False


def test_disconnect_aborts_and_queue_full_gives_429(server, client):
    body = {"model": MODEL, "messages": FRANCE, "max_tokens": 2000, "stream": True, "ignore_eos": True}
    streams, readers = [], []  # keep the line iterators alive: dropping one closes its connection
    try:
        with httpx.Client(timeout=60, headers=auth()) as http:
            # the test server admits max_num_seqs (4) + max_queue (0) requests at once
            for _ in range(4):
                cm = http.stream("POST", server.url + "/v1/chat/completions", json=body)
                r = cm.__enter__()
                streams.append(cm)
                readers.append(r.iter_lines())
                assert next(readers[-1]).startswith("data: ")
            assert httpx.get(server.url + "/health").json()["models"][MODEL]["active"] == 4
            over = http.post(server.url + "/v1/chat/completions", json=dict(body, stream=False, max_tokens=2))
            assert over.status_code == 429 and over.headers["retry-after"]
            assert over.json()["error"]["code"] == "queue_full"
            assert all(next(x) is not None for x in readers)  # still streaming
    finally:
        for cm in streams:
            cm.__exit__(None, None, None)  # client disconnects mid-stream
    assert _wait_idle(server), "aborted streams still running in the engine"
    assert httpx.get(server.url + "/health").json()["models"][MODEL]["active"] == 0
    # a non-streamed request whose client gives up is aborted too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", headers=auth(), timeout=2.0,
                   json=dict(body, stream=False))
    assert _wait_idle(server), "abandoned request still running in the engine"
    deadline = time.time() + 5
    while httpx.get(server.url + "/health").json()["models"][MODEL]["active"] and time.time() < deadline:
        time.sleep(0.1)
    assert httpx.get(server.url + "/health").json()["models"][MODEL]["active"] == 0
    r = client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=2, temperature=0)
    assert r.choices[0].message.content


def test_cors_preflight(server):
    ok = httpx.options(server.url + "/v1/chat/completions", headers={
        "Origin": "http://example.test", "Access-Control-Request-Method": "POST"})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "http://example.test"
    bad = httpx.options(server.url + "/v1/chat/completions", headers={
        "Origin": "http://evil.test", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in bad.headers
