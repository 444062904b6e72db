"""Admin conversion jobs over REST, end to end: a real child process runs quantize.convert on tiny
random Llama models (SmolLM2's tokenizer), with progress, load_after, cancel, SIGKILL, a server
crash and restart, and the path rules of the models directory."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from realdata import smollm2_gguf
from test_server_harness import CLIServer

ADMIN = "admin-secret"
H = {"Authorization": f"Bearer {ADMIN}"}


def random_llama(out: Path, tok, hidden: int, inter: int, layers: int, seed: int = 0) -> Path:
    """A random Llama checkpoint in HF layout (config.json + model.safetensors) with SmolLM2's tokenizer."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    heads, kv_heads = 4, 2
    hd = hidden // heads

    def w(*shape):
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    tensors = {"model.embed_tokens.weight": w(tok.vocab_size, hidden), "model.norm.weight": np.ones(hidden, np.float32)}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors.update({
            p + "self_attn.q_proj.weight": w(hidden, hidden), p + "self_attn.k_proj.weight": w(kv_heads * hd, hidden),
            p + "self_attn.v_proj.weight": w(kv_heads * hd, hidden), p + "self_attn.o_proj.weight": w(hidden, hidden),
            p + "mlp.gate_proj.weight": w(inter, hidden), p + "mlp.up_proj.weight": w(inter, hidden),
            p + "mlp.down_proj.weight": w(hidden, inter),
            p + "input_layernorm.weight": np.ones(hidden, np.float32),
            p + "post_attention_layernorm.weight": np.ones(hidden, np.float32)})
    out.mkdir(parents=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": tok.vocab_size,
              "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
              "num_attention_heads": heads, "num_key_value_heads": kv_heads, "max_position_embeddings": 512,
              "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True, "hidden_act": "silu",
              "bos_token_id": tok.bos_token_id, "eos_token_id": sorted(tok.eos_token_ids)[0],
              "torch_dtype": "float32"}
    (out / "config.json").write_text(json.dumps(config))
    tok.save(out)
    return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    from jang_serve.engine.loader.gguf import read_gguf

    tok = read_gguf(smollm2_gguf(), with_weights=False).tokenizer
    root = tmp_path_factory.mktemp("sources")
    return {"tiny": random_llama(root / "tiny", tok, 64, 128, 2),
            "medium": random_llama(root / "medium", tok, 256, 768, 8)}


def start(models_dir: Path) -> CLIServer:
    return CLIServer(["--no-default-model", "--admin-key", ADMIN, "--models-dir", str(models_dir),
                      "--log-level", "warning"]).wait_ready(60)


def job(srv, job_id) -> dict:
    r = httpx.get(f"{srv.url}/admin/jobs/{job_id}", headers=H)
    assert r.status_code == 200, r.text
    return r.json()


def wait_for(srv, job_id, pred, timeout=120.0, every=0.05) -> tuple[dict, list[dict]]:
    seen, deadline = [], time.time() + timeout
    while time.time() < deadline:
        j = job(srv, job_id)
        seen.append(j)
        if pred(j):
            return j, seen
        time.sleep(every)
    raise TimeoutError(f"job {job_id} stuck: {seen[-1]}")


def submit(srv, **body) -> dict:
    r = httpx.post(srv.url + "/admin/convert", headers=H, json=body)
    assert r.status_code == 202, r.text
    assert r.headers["location"] == f"/admin/jobs/{r.json()['id']}"
    return r.json()


def ended(j):
    return j["state"] in ("completed", "failed", "cancelled", "interrupted")


def test_jobs_end_to_end_with_faults_and_restart(sources, tmp_path):
    models = tmp_path / "models"
    srv = start(models)
    try:
        # 1. a tiny model converts, is published, and load_after serves it
        j = submit(srv, source=str(sources["tiny"]), profile="JANG_4M", output="tiny-4bit", load_after=True)
        assert j["state"] in ("queued", "running")
        done, _ = wait_for(srv, j["id"], ended)
        assert done["state"] == "completed", (done["error"], done["log_tail"])
        assert done["percent"] == 100.0 and done["current_tensor"]
        res = done["result"]
        assert Path(res["path"]) == (models / "tiny-4bit").resolve() and (models / "tiny-4bit" / "config.json").is_file()
        assert 4.0 <= res["average_bits"] < 16 and res["size_bytes"] > 0
        deadline = time.time() + 60
        while "tiny-4bit" not in [m["id"] for m in httpx.get(srv.base_url + "/models").json()["data"]]:
            assert time.time() < deadline, httpx.get(srv.url + "/health").text
            time.sleep(0.2)
        r = httpx.post(srv.base_url + "/chat/completions", timeout=60, json={
            "model": "tiny-4bit", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1

        # 2. SIGKILL of the child mid-conversion: failed, nothing visible, staging cleaned. The jobs
        # that are stopped midway use GPTQ (about a second per layer here) so that they are still
        # running when the test acts: an RTN conversion of this model ends in about 0.15 s.
        k = submit(srv, source=str(sources["medium"]), profile="JANG_3M", method="gptq", output="killed")
        running, seen = wait_for(srv, k["id"], lambda x: ended(x) or (x["state"] == "running" and 0 < x["percent"]))
        assert running["state"] == "running", running
        assert any(0 < s["percent"] < 100 and s["eta_s"] is not None for s in seen)
        os.kill(running["pid"], signal.SIGKILL)
        failed, _ = wait_for(srv, k["id"], ended)
        assert failed["state"] == "failed" and "SIGKILL" in failed["error"]
        assert not (models / "killed").exists() and not (models / ".staging" / k["id"]).exists()

        # 3. cancel a running job
        c = submit(srv, source=str(sources["medium"]), profile="JANG_3M", method="gptq", output="cancelled")
        wait_for(srv, c["id"], lambda x: x["state"] == "running")
        r = httpx.delete(f"{srv.url}/admin/jobs/{c['id']}", headers=H, timeout=30)
        assert r.status_code == 200
        gone, _ = wait_for(srv, c["id"], ended)
        assert gone["state"] == "cancelled" and not (models / "cancelled").exists()
        assert httpx.delete(f"{srv.url}/admin/jobs/{c['id']}", headers=H).status_code == 409

        # 4. the server crashes (SIGKILL) while a job runs
        i = submit(srv, source=str(sources["medium"]), profile="JANG_3M", method="gptq", output="interrupted")
        wait_for(srv, i["id"], lambda x: x["state"] == "running" and x["pid"])
    finally:
        srv.stop(signal.SIGKILL)

    # 5. a new server on the same models dir: the job list survived, the crashed job is interrupted
    srv2 = start(models)
    try:
        jobs = {x["id"]: x for x in httpx.get(srv2.url + "/admin/jobs", headers=H).json()["data"]}
        assert jobs[j["id"]]["state"] == "completed" and jobs[j["id"]]["result"]["path"] == res["path"]
        assert jobs[k["id"]]["state"] == "failed"
        assert jobs[c["id"]]["state"] == "cancelled"
        assert jobs[i["id"]]["state"] == "interrupted"
        time.sleep(1.0)  # the orphaned child notices its parent is gone at its next progress report
        assert not (models / "interrupted").exists()
        assert not (models / ".staging" / i["id"]).exists()
        assert (models / "tiny-4bit" / "config.json").is_file()
    finally:
        srv2.stop()


def test_output_paths_and_sources_are_checked(sources, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (models / "link").symlink_to(outside)
    (models / "taken").mkdir()
    srv = start(models)
    try:
        src = str(sources["tiny"])
        for output, status in [("/etc/evil", 400), ("../escape", 400), ("a/../../escape", 400), ("link/x", 400),
                               (".hidden", 400), ("taken", 409)]:
            r = httpx.post(srv.url + "/admin/convert", headers=H, json={"source": src, "bits": 4, "output": output})
            assert r.status_code == status, (output, r.text)
            assert r.json()["error"]["param"] == "output"
        bad = httpx.post(srv.url + "/admin/convert", headers=H, json={"source": src, "profile": "JANG_99Z"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "profile"
        both = httpx.post(srv.url + "/admin/convert", headers=H, json={"source": src, "profile": "JANG_4M", "bits": 4})
        assert both.status_code == 400
        missing = httpx.post(srv.url + "/admin/convert", headers=H, json={"source": "/no/such/dir"})
        assert missing.status_code == 400 and missing.json()["error"]["code"] == "source_not_found"
        assert httpx.get(srv.url + "/admin/jobs").status_code == 401
        # a Hugging Face repo id is accepted, and fails clearly on a machine without internet
        hub = submit(srv, source="HuggingFaceTB/SmolLM2-135M-Instruct", bits=4, output="from-hub")
        failed, _ = wait_for(srv, hub["id"], ended, every=0.2)
        assert failed["state"] == "failed" and "Hugging Face Hub" in failed["error"] and "local path" in failed["error"]
        assert not (models / "from-hub").exists() and not list(outside.iterdir())
    finally:
        srv.stop()


def test_admin_is_disabled_without_a_key(tmp_path):
    srv = CLIServer(["--no-default-model", "--models-dir", str(tmp_path), "--log-level", "warning"]).wait_ready(60)
    try:
        r = httpx.get(srv.url + "/admin/jobs", headers=H)
        assert r.status_code == 403 and r.json()["error"]["code"] == "admin_disabled"
    finally:
        srv.stop()
