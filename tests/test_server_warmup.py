"""Engine warm-up before /health says ready (on by default on a GPU, forced here on the CPU with
JANG_SERVE_WARMUP=1): real generations at every batch bucket up to max_num_seqs, all freed after."""

from __future__ import annotations

import tempfile
from pathlib import Path

import httpx

from jang_serve.loadgen.servers import ServerProcess
from jang_serve.server.warmup import batch_sizes
from serve_helpers import jang_serve_args, metric, tiny_model_dir


def test_batch_sizes():
    assert batch_sizes(1) == [1]
    assert batch_sizes(8) == [1, 2, 4, 8]
    assert batch_sizes(12) == [1, 2, 4, 8, 12]
    assert batch_sizes(64) == [1, 2, 4, 8, 16, 32, 64]


def _server(warm: str) -> ServerProcess:
    args = jang_serve_args(tiny_model_dir(), "--kv-memory", "0.05", "--max-num-seqs", "8")
    log = Path(tempfile.mkstemp(prefix="jang-warm-", suffix=".log")[1])
    return ServerProcess(args, "jang-serve", log_path=log, ready_path="/health",
                         env={"JANG_SERVE_HOME": tempfile.mkdtemp(prefix="jang-home-"), "JANG_SERVE_WARMUP": warm})


def test_warmup_runs_every_batch_bucket_before_ready():
    with _server("1") as srv, _server("0") as cold:
        # 1 + 2 + 4 + 8 distinct 24-token prompts ran: one full KV block each stays cached for reuse
        assert metric(srv.url, "jang_kv_blocks_cached") == 15
        assert metric(cold.url, "jang_kv_blocks_cached") == 0
        for s in (srv, cold):  # nothing left running or holding blocks, and the server answers
            assert metric(s.url, "jang_requests_running") == 0 and metric(s.url, "jang_kv_blocks_used") == 0
        outs = [httpx.post(s.url + "/v1/completions", json={"prompt": "The os module", "max_tokens": 6,
                                                              "temperature": 0}, timeout=60).json()
                for s in (srv, cold)]
        assert outs[0]["choices"][0]["text"] == outs[1]["choices"][0]["text"]
