"""The load generator (`jangq bench serve`) against real servers on loopback: jang-serve and mlx-lm."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jang_serve.loadgen import cli, prompts, stats
from serve_helpers import mlx_lm_args, shared_jang_serve, tiny_model_dir

PCT = ("p50", "p95", "p99")


def _ordered(d: dict) -> None:
    assert d["n"] > 0
    assert d["min"] <= d["p50"] <= d["p95"] <= d["p99"] <= d["max"], d


def test_percentile_matches_numpy():
    rng = random.Random(3)
    for n in (1, 2, 7, 100):
        xs = [rng.random() for _ in range(n)]
        for q in (0, 50, 95, 99, 100):
            assert stats.percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    assert stats.percentile([], 50) is None


def test_bench_closed_loop_against_jang_serve(tmp_path):
    srv = shared_jang_serve()
    out = tmp_path / "bench.json"
    rc = cli.main(["--url", srv.url, "--concurrency", "1,4", "--requests", "8", "--prompt-tokens", "32",
                   "--max-tokens", "12", "--tokenizer", str(tiny_model_dir()), "--warmup-levels", "--json", str(out)])
    assert rc == 0
    rec = json.loads(out.read_text())
    env = rec["environment"]
    for key in ("device", "cores", "date", "jang_serve_commit"):
        assert env[key], key
    assert env["versions"]["mlx"] and env["versions"]["mlx-lm"] == "0.32.2"
    assert rec["settings"]["max_tokens"] == 12 and rec["settings"]["request_extra"]["ignore_eos"] is True
    assert rec["settings"]["eos_ids"] == [0, 2]  # from the model folder, biased away for a fixed length
    assert [r["concurrency"] for r in rec["runs"]] == [1, 4]
    # 2 warm-up requests, then one unmeasured round per level (1 + 4), then the measured slices
    assert [r["bodies"] for r in rec["runs"]] == [[7, 15], [15, 23]] and rec["settings"]["warmup_levels"]
    for run in rec["runs"]:
        s = run["summary"]
        assert (s["requests"], s["completed"], s["failed"]) == (8, 8, 0)
        assert len(run["raw"]) == 8 and sorted(r["index"] for r in run["raw"]) == list(range(8))
        # fixed output length, and the token counts come from the server's usage
        assert s["usage_reported"] == 8 and s["output_tokens"] == 8 * 12
        assert all(r["completion_tokens"] == 12 and r["finish_reason"] == "length" for r in run["raw"])
        assert all(30 <= r["prompt_tokens"] <= 34 for r in run["raw"])
        for key in ("ttft_s", "tpot_s", "itl_s", "latency_s"):
            _ordered(s[key])
        assert s["ttft_s"]["p50"] < s["latency_s"]["p50"]
        assert s["output_token_throughput"] == pytest.approx(s["output_tokens"] / s["wall_s"])
    agg = {a["concurrency"]: a for a in rec["aggregate"]}
    assert set(agg) == {1, 4} and agg[4]["output_token_throughput"]["median"] > 0


def test_poisson_open_loop(tmp_path):
    srv = shared_jang_serve()
    out = tmp_path / "rate.json"
    assert cli.main(["--url", srv.url, "--rate", "25", "--requests", "10", "--prompt-tokens", "16",
                     "--max-tokens", "6", "--json", str(out), "--warmup", "1"]) == 0
    rec = json.loads(out.read_text())
    (run,) = rec["runs"]
    assert run["mode"] == "rate" and run["rate"] == 25
    assert run["summary"]["completed"] == 10 and run["summary"]["failed"] == 0


def test_jsonl_chat_prompts(tmp_path):
    srv = shared_jang_serve()
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"Say {i}"}], "max_tokens": 5})
                           for i in range(4)) + "\n")
    out = tmp_path / "chat.json"
    assert cli.main(["--url", srv.url, "--prompts", str(f), "--concurrency", "2", "--requests", "6",
                     "--warmup", "0", "--json", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["settings"]["endpoint_path"] == "/v1/chat/completions"
    s = rec["runs"][0]["summary"]
    assert s["completed"] == 6 and all(r["completion_tokens"] <= 5 for r in rec["runs"][0]["raw"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"nothing": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: each line needs"):
        prompts.load_jsonl(bad)


def test_failures_are_reported_not_hidden(tmp_path):
    srv = shared_jang_serve()
    with pytest.raises(SystemExit, match="every warm-up request failed.*HTTP 404"):
        cli.main(["--url", srv.url, "--model", "no-such-model", "--concurrency", "1", "--requests", "2"])
    with pytest.raises(SystemExit, match="exactly one of"):
        cli.main(["--concurrency", "1"])


def _float16_copy(src: Path, dst: Path) -> Path:
    import shutil

    import mlx.core as mx

    shutil.copytree(src, dst)
    w = mx.load(str(dst / "model.safetensors"))
    mx.save_safetensors(str(dst / "model.safetensors"), {k: v.astype(mx.float16) for k, v in w.items()})
    return dst


def test_side_by_side_with_mlx_lm(tmp_path, monkeypatch):
    """One invocation: our server and mlx_lm.server on the same model folder, same load, interleaved, with
    ratios. The folder is float16: mlx-lm gets a float32 copy (jang-serve computes in float32 on CPU)."""
    from jang_serve.loadgen import baseline

    monkeypatch.setattr(baseline, "CACHE", tmp_path / "cache")
    model = _float16_copy(tiny_model_dir(), tmp_path / "tiny-f16")
    out = tmp_path / "side.json"
    rc = cli.main(["--serve-model", str(model), "--serve-args", "--kv-memory 0.05 --log-level warning",
                   "--baseline", "mlx-lm", "--baseline-model", str(model),
                   "--concurrency", "1,4", "--requests", "4,6", "--prompt-tokens", "24", "--max-tokens", "8",
                   "--repeat", "2", "--json", str(out), "--log-dir", str(tmp_path)])
    assert rc == 0
    rec = json.loads(out.read_text())
    assert [t["name"] for t in rec["targets"]] == ["jang-serve", "mlx-lm"]
    # what each served: the same folder; mlx-lm's copy holds the same tensors in float32
    served = rec["served"]
    assert served["jang-serve"]["path"] == str(model) and served["jang-serve"]["float_dtypes"] == ["float16"]
    assert served["mlx-lm"]["made_from"] == str(model) and served["mlx-lm"]["float_dtypes"] == ["float32"]
    assert served["mlx-lm"]["size_bytes"] > 1.9 * served["jang-serve"]["size_bytes"]  # all float: twice the bytes
    assert baseline.mlx_lm_folder(model, dtype="float32") == Path(rec["baseline_model_dir"])  # cached once
    assert baseline.mlx_lm_folder(model, dtype="float16") == model  # already in that dtype: served as is
    # interleaved A B per level, twice; 4 then 6 requests
    order = [(r["repeat"], r["concurrency"], r["target"]) for r in rec["runs"]]
    assert order == [(p, c, t) for p in (0, 1) for c in (1, 4) for t in ("jang-serve", "mlx-lm")]
    # the same prompts for both servers, fresh ones for every (repeat, level): no prefix-cache hits
    slices = [tuple(r["bodies"]) for r in rec["runs"]]
    assert slices[0::2] == slices[1::2]
    assert slices[0::2] == [(2, 6), (6, 12), (12, 16), (16, 22)]  # after the 2 warm-up requests
    for run in rec["runs"]:
        n = 4 if run["concurrency"] == 1 else 6
        assert run["summary"]["completed"] == n and run["summary"]["output_tokens"] == 8 * n
    # identical load: both servers got the same prompts; greedy outputs agree at concurrency 1
    # (mlx-lm's detokenizer drops the first token's leading space, hence lstrip)
    a = {r["index"]: r["text_head"].lstrip() for r in rec["runs"][0]["raw"]}
    b = {r["index"]: r["text_head"].lstrip() for r in rec["runs"][1]["raw"]}
    assert a == b
    ratios = {r["concurrency"]: r for r in rec["ratios"]}
    assert set(ratios) == {1, 4}
    for r in ratios.values():
        v = r["output_token_throughput"]
        assert r["repeats"] == 2 and len(v["values"]) == 2 and v["min"] <= v["median"] <= v["max"]
    # both servers were stopped
    for t in rec["targets"]:
        port = int(t["url"].rsplit(":", 1)[1])
        with pytest.raises(Exception):
            import httpx

            httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)


def test_jangq_dispatches_bench_and_quantizer():
    exe = Path(sys.executable).with_name("jangq")
    r = subprocess.run([str(exe), "bench", "serve", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--baseline" in r.stdout and "--concurrency" in r.stdout
    r = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "convert" in r.stdout  # the quantizer's own CLI
