"""Bad input at scale: schemathesis generates valid and invalid requests from the server's own
/openapi.json for every /v1 route (a bounded number of examples each); the server must never answer
5xx, and every error must have the OpenAI shape {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import json
import os

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.generation.modes import GenerationMode

from serve_helpers import shared_jang_serve

EXAMPLES = int(os.environ.get("JANG_SCHEMATHESIS_EXAMPLES", "10"))


@pytest.fixture(scope="module")
def server():
    # the shared server's short context (--max-model-len 256) bounds the work of any generated request
    # (max_tokens has no upper bound in the schema)
    return shared_jang_serve()


def _check_openai_error(resp: requests.Response, where: str) -> None:
    assert resp.status_code < 500, f"{where}: {resp.status_code} {resp.text[:500]}"
    if resp.status_code < 400:
        return
    try:
        body = resp.json()
    except ValueError:
        raise AssertionError(f"{where}: error {resp.status_code} is not JSON: {resp.text[:300]!r}") from None
    err = body.get("error") if isinstance(body, dict) else None
    assert isinstance(err, dict), f"{where}: error {resp.status_code} not in the OpenAI shape: {body}"
    assert isinstance(err.get("message"), str) and err["message"], f"{where}: {body}"
    assert isinstance(err.get("type"), str) and err["type"], f"{where}: {body}"
    assert "param" in err and "code" in err, f"{where}: {body}"


def _operations(url: str):
    schema = schemathesis.openapi.from_url(url + "/openapi.json").include(path_regex=r"^/v1/")
    ops = [r.ok() for r in schema.get_all_operations()]
    assert {op.path for op in ops} >= {"/v1/chat/completions", "/v1/completions", "/v1/models"}
    return ops


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_v1_routes_never_5xx_and_errors_are_openai_shaped(server, mode):
    seen: dict[str, dict[int, int]] = {}
    for op in _operations(server.url):
        label = f"{op.method.upper()} {op.path} ({mode.value})"
        counts = seen.setdefault(label, {})

        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                  phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy(generation_mode=mode))
        def run(case):
            resp = case.call(base_url=server.url, timeout=60)
            counts[resp.status_code] = counts.get(resp.status_code, 0) + 1
            _check_openai_error(resp, f"{label}: {case.method} {case.formatted_path} body="
                                      f"{json.dumps(case.body, default=str)[:300] if case.body is not None else None}")

        try:
            run()
        except Unsatisfiable:
            # a GET with no body (/v1/models, /v1/models/{id}: any string is a valid path) has no invalid variant
            assert mode is GenerationMode.NEGATIVE and not op.body, label
            seen.pop(label)
    print({k: dict(sorted(v.items())) for k, v in seen.items()})
    # the generator did reach the server, and (for negative data) got rejections
    assert all(sum(c.values()) > 0 for c in seen.values()), seen
    if mode is GenerationMode.NEGATIVE:
        assert any(s >= 400 for c in seen.values() for s in c), seen
    else:
        assert any(s == 200 for c in seen.values() for s in c), seen
