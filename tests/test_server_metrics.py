"""/metrics is scraped in Prometheus text format and its counters move with traffic."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from jang_serve.server.default_model import DEFAULT_MODEL_NAME as MODEL
from test_server_harness import auth, smollm2_server


@pytest.fixture(scope="module")
def server():
    return smollm2_server()


def scrape(server) -> dict[tuple, float]:
    r = httpx.get(server.url + "/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def get(m: dict, name: str, **labels) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def test_counters_move_with_traffic(server):
    before = scrape(server)
    r = httpx.post(server.url + "/v1/chat/completions", headers=auth(), timeout=120, json={
        "model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200
    usage = r.json()["usage"]
    bad = httpx.post(server.url + "/v1/chat/completions", headers=auth(), json={"model": MODEL, "messages": []})
    assert bad.status_code == 400
    after = scrape(server)
    ok = dict(route="/v1/chat/completions", method="POST", status="200")
    err = dict(route="/v1/chat/completions", method="POST", status="400")
    assert get(after, "jang_http_requests_total", **ok) == get(before, "jang_http_requests_total", **ok) + 1
    assert get(after, "jang_http_requests_total", **err) == get(before, "jang_http_requests_total", **err) + 1
    assert get(after, "jang_generation_tokens_total", model=MODEL) - get(
        before, "jang_generation_tokens_total", model=MODEL) == usage["completion_tokens"]
    assert get(after, "jang_prompt_tokens_total", model=MODEL) - get(
        before, "jang_prompt_tokens_total", model=MODEL) == usage["prompt_tokens"]
    ttft = "jang_time_to_first_token_seconds_count"
    assert get(after, ttft, model=MODEL) == get(before, ttft, model=MODEL) + 1
    # engine gauges come from the engine's own stats
    assert get(after, "jang_kv_blocks_free", model=MODEL) > 0
    assert (("jang_requests_running", (("model", MODEL),)) in after)
    assert 0.0 <= get(after, "jang_prefix_cache_hit_rate", model=MODEL) <= 1.0
