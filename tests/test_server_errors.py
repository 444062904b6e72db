"""Every client mistake gets its status and an OpenAI error object, and the server keeps serving."""

from __future__ import annotations

import httpx
import pytest

from jang_serve.server.default_model import DEFAULT_MODEL_NAME as MODEL
from test_server_harness import ADMIN_KEY, auth, smollm2_server

MSG = [{"role": "user", "content": "Hi"}]
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def server():
    return smollm2_server()


def chat(**kw) -> dict:
    return {"model": MODEL, "messages": MSG, "max_tokens": 2, **kw}


# (name, method, path, kwargs for httpx, status, code, param)
CASES = [
    ("malformed_json", "POST", "/v1/chat/completions", {"content": b'{"model": "x", "messages": [', "headers": JSON},
     400, "invalid_json", None),
    ("not_an_object", "POST", "/v1/chat/completions", {"content": b"[1, 2]", "headers": JSON}, 400, "invalid_json", None),
    ("invalid_utf8", "POST", "/v1/chat/completions",
     {"content": b'{"model": "m", "messages": [{"role": "user", "content": "\xff\xfe"}]}', "headers": JSON},
     400, "invalid_json", None),
    ("messages_wrong_type", "POST", "/v1/chat/completions", {"json": {"model": MODEL, "messages": "hi"}},
     400, "invalid_value", "messages"),
    ("max_tokens_string", "POST", "/v1/chat/completions", {"json": chat(max_tokens="many")}, 400, "invalid_value",
     "max_tokens"),
    ("max_tokens_negative", "POST", "/v1/chat/completions", {"json": chat(max_tokens=-5)}, 400, "invalid_value",
     "max_tokens"),
    ("max_tokens_huge", "POST", "/v1/chat/completions", {"json": chat(max_tokens=10**9)}, 400,
     "context_length_exceeded", "messages"),
    ("temperature_out_of_range", "POST", "/v1/chat/completions", {"json": chat(temperature=7.5)}, 400,
     "invalid_value", "temperature"),
    ("top_p_zero", "POST", "/v1/chat/completions", {"json": chat(top_p=0)}, 400, "invalid_value", "top_p"),
    ("empty_messages", "POST", "/v1/chat/completions", {"json": chat(messages=[])}, 400, "invalid_value", "messages"),
    ("bad_role", "POST", "/v1/chat/completions", {"json": chat(messages=[{"role": "wizard", "content": "x"}])}, 400,
     "invalid_value", "messages[0].role"),
    ("n_too_big", "POST", "/v1/chat/completions", {"json": chat(n=1000)}, 400, "invalid_value", "n"),
    ("logit_bias_out_of_vocab", "POST", "/v1/chat/completions", {"json": chat(logit_bias={"99999999": 5})}, 400,
     None, "logit_bias"),
    ("tool_choice_without_tools", "POST", "/v1/chat/completions", {"json": chat(tool_choice="required")}, 400,
     "invalid_value", None),
    ("image_content", "POST", "/v1/chat/completions",
     {"json": chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])},
     400, None, "messages[0].content"),
    ("unknown_model", "POST", "/v1/chat/completions", {"json": chat(model="gpt-17")}, 404, "model_not_found",
     "model"),
    ("completion_empty_prompt", "POST", "/v1/completions", {"json": {"model": MODEL, "prompt": []}}, 400,
     "invalid_value", "prompt"),
    ("completion_bad_token_ids", "POST", "/v1/completions", {"json": {"model": MODEL, "prompt": [1, -3]}}, 400, None,
     "prompt"),
    ("suffix_without_fim_tokens", "POST", "/v1/completions",
     {"json": {"model": MODEL, "prompt": "def f(", "suffix": "\n    return x\n"}}, 400, "invalid_value", "suffix"),
    ("suffix_with_echo", "POST", "/v1/completions",
     {"json": {"model": MODEL, "prompt": "def f(", "suffix": ")", "echo": True}}, 400, "invalid_value", None),
    ("body_10mb", "POST", "/v1/chat/completions", {"content": b"x" * (10 * 1024 * 1024), "headers": JSON}, 413,
     "request_too_large", None),
    ("no_key", "POST", "/v1/chat/completions", {"json": chat(), "anon": True}, 401, "invalid_api_key", None),
    ("bad_key", "GET", "/v1/models", {"headers": {"Authorization": "Bearer wrong"}}, 401, "invalid_api_key", None),
    ("api_key_on_admin", "GET", "/admin/jobs", {}, 401, "invalid_api_key", None),
    ("unknown_route", "GET", "/v1/nothing-here", {}, 404, "not_found", None),
    ("wrong_method", "DELETE", "/v1/chat/completions", {}, 405, "method_not_allowed", None),
    ("unknown_job", "GET", "/admin/jobs/job_nope", {"headers": {"Authorization": f"Bearer {ADMIN_KEY}"}}, 404,
     "job_not_found", "job_id"),
]


@pytest.mark.parametrize("name,method,path,kw,status,code,param", CASES, ids=[c[0] for c in CASES])
def test_error_shape(server, name, method, path, kw, status, code, param):
    kw = dict(kw)
    headers = dict(kw.pop("headers", {}))
    if "Authorization" not in headers and not kw.pop("anon", False):
        headers.update(auth())
    r = httpx.request(method, server.url + path, headers=headers, timeout=60, **kw)
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    err = body["error"]
    assert isinstance(err["message"], str) and len(err["message"]) > 10
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    # still serving
    assert httpx.get(server.url + "/v1/models", headers=auth(), timeout=10).status_code == 200


def test_context_overflow_names_both_numbers(server):
    ctx = httpx.get(server.url + f"/v1/models/{MODEL}", headers=auth()).json()["context_length"]
    long = "hello " * (ctx + 100)
    r = httpx.post(server.url + "/v1/completions", headers=auth(), timeout=60,
                   json={"model": MODEL, "prompt": long, "max_tokens": 5})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded" and str(ctx) in err["message"]
    prompt_tokens = int(err["message"].split("(")[1].split(" ")[0])
    assert prompt_tokens > ctx


def test_bad_json_schema_is_a_400_even_when_streaming(server):
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}
    for stream in (False, True):
        r = httpx.post(server.url + "/v1/chat/completions", headers=auth(), timeout=60,
                       json=chat(response_format=bad, stream=stream))
        assert r.status_code == 400, r.text
        assert r.json()["error"]["type"] == "invalid_request_error"


def test_server_still_generates_after_errors(server):
    r = httpx.post(server.url + "/v1/chat/completions", headers=auth(), timeout=120, json=chat(temperature=0))
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
