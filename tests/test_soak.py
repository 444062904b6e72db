"""Soak: many concurrent streaming clients for several rounds, some hanging up mid-stream.

Checks, against the real jang-serve CLI on loopback: every completed response equals the greedy
single-request output for its prompt, no request lost or answered twice, the server counts match
what was sent, all KV blocks are free at the end, and the server's RSS does not grow round over round.
The fast version runs by default; the 64-client one is marked slow and writes bench/results/soak-cpu.json.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path

import httpx
import pytest

from jang_serve.loadgen import envinfo
from jang_serve.loadgen.prompts import synthetic
from jang_serve.loadgen.report import write_json
from jang_serve.loadgen.runner import run_closed_loop
from jang_serve.loadgen.servers import rss_bytes
from serve_helpers import metric, shared_jang_serve, start_jang_serve

REPO = Path(__file__).resolve().parent.parent


def _counter(url: str, route: str, status: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith("jang_http_requests_total{") and all(
                f'{k}="{v}"' in line for k, v in (("route", route), ("status", status), ("method", "POST"))):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _wait_idle(url: str, timeout: float = 30.0) -> dict:
    """Poll /metrics until nothing runs or waits and no KV block is in use."""
    deadline = time.monotonic() + timeout
    while True:
        m = {k: metric(url, k) for k in ("jang_requests_running", "jang_requests_waiting", "jang_kv_blocks_used",
                                          "jang_kv_blocks_free")}
        if (m["jang_requests_running"], m["jang_requests_waiting"], m["jang_kv_blocks_used"]) == (0, 0, 0):
            return m
        if time.monotonic() > deadline:
            return m
        time.sleep(0.2)


def soak(srv, clients: int, rounds: int, per_round: int, n_prompts: int, max_tokens: int, prompt_tokens: int,
         abort_fraction: float = 0.3, seed: int = 0, model: str | None = None) -> dict:
    url = srv.url
    model = model or httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
    texts = synthetic(n_prompts, prompt_tokens, seed=seed)
    body = lambda p: {"model": model, "prompt": texts[p], "max_tokens": max_tokens, "temperature": 0,  # noqa: E731
                      "ignore_eos": True}
    endpoint = url + "/v1/completions"

    # the oracle: each prompt alone, one at a time
    ref_res, _ = asyncio.run(run_closed_loop(endpoint, lambda i: body(i), n_prompts, 1))
    assert all(r.ok for r in ref_res), [r.error for r in ref_res if not r.ok]
    reference = [r.text for r in ref_res]
    assert all(r.completion_tokens == max_tokens for r in ref_res)

    rng = random.Random(seed)
    sent_before = _counter(url, "/v1/completions", "200")
    aborted_before = metric(url, "jang_requests_aborted_total") or 0.0
    rounds_out, all_ids = [], []
    total_sent = total_aborts = 0
    for rnd in range(rounds):
        plan = [(rng.randrange(n_prompts), rng.randint(1, max_tokens // 2) if rng.random() < abort_fraction else None)
                for _ in range(per_round)]
        t0 = time.perf_counter()
        res, wall = asyncio.run(run_closed_loop(endpoint, lambda i: body(plan[i][0]), per_round, clients,
                                                abort_fn=lambda i: plan[i][1]))
        total_sent += per_round
        assert len(res) == per_round and sorted(r.index for r in res) == list(range(per_round))
        bad = [r for r in res if not r.ok and not r.aborted]
        assert not bad, [(r.index, r.error) for r in bad[:5]]
        done = [r for r in res if r.ok]
        aborts = [r for r in res if r.aborted]
        total_aborts += len(aborts)
        assert all(plan[r.index][1] is not None for r in aborts)
        mismatched = [r.index for r in done if r.text != reference[plan[r.index][0]]]
        assert not mismatched, f"round {rnd}: {len(mismatched)} responses differ from single-request greedy output"
        assert all(r.completion_tokens == max_tokens and r.finish_reason == "length" for r in done)
        all_ids += [r.response_id for r in res]
        idle = _wait_idle(url)
        assert idle["jang_kv_blocks_used"] == 0, f"round {rnd}: KV blocks still in use: {idle}"
        rounds_out.append({"round": rnd, "requests": per_round, "completed": len(done), "aborted": len(aborts),
                           "wall_s": wall, "output_tokens": sum(r.output_tokens for r in done),
                           "rss_bytes": rss_bytes(srv.pid), "idle": idle,
                           "seconds": time.perf_counter() - t0})
    # nothing lost or answered twice: every request has its own response id, and the server counted each once
    assert None not in all_ids and len(set(all_ids)) == len(all_ids) == total_sent
    assert _counter(url, "/v1/completions", "200") - sent_before == total_sent
    aborted = (metric(url, "jang_requests_aborted_total") or 0.0) - aborted_before
    return {"clients": clients, "rounds": rounds_out, "requests": total_sent, "client_aborts": total_aborts,
            "server_aborted": aborted, "max_tokens": max_tokens, "prompt_tokens": prompt_tokens,
            "distinct_prompts": n_prompts, "model": model}


def _rss_flat(rounds: list[dict], slack: float) -> tuple[bool, list[int]]:
    """RSS after the later rounds stays within `slack` of the RSS after round 1 (warm-up is round 0)."""
    rss = [r["rss_bytes"] for r in rounds]
    base = rss[1] if len(rss) > 2 else rss[0]
    return all(x <= base * (1 + slack) for x in rss[2:]), rss


def test_soak_fast():
    srv = shared_jang_serve()
    out = soak(srv, clients=16, rounds=4, per_round=32, n_prompts=8, max_tokens=16, prompt_tokens=24)
    assert out["client_aborts"] > 0  # the plan did hang up mid-stream
    assert 0 < out["server_aborted"] <= out["client_aborts"]  # the server noticed (fast ends may finish first)
    ok, rss = _rss_flat(out["rounds"], slack=0.05)
    assert ok, f"RSS grew round over round: {rss}"


@pytest.mark.slow
def test_soak_64_clients():
    """64 clients x 10 rounds of 256 requests on a fresh server; the results are committed."""
    srv = start_jang_serve(None, "--max-num-seqs", "64", "--max-queue", "256", "--max-model-len", "256")
    try:
        out = soak(srv, clients=64, rounds=10, per_round=256, n_prompts=32, max_tokens=32, prompt_tokens=48)
    finally:
        srv.stop()
    ok, rss = _rss_flat(out["rounds"], slack=0.05)
    record = {"kind": "soak", "environment": envinfo.environment(), "server": srv.cmd, **out,
              "rss_flat": ok, "rss_bytes": rss}
    write_json(REPO / "bench" / "results" / "soak-cpu.json", record)
    assert out["server_aborted"] <= out["client_aborts"]
    assert ok, f"RSS grew round over round: {rss}"
