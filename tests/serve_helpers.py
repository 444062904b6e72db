"""Helpers for the serving tests (loadgen, soak, faults, schemathesis): a tiny real model folder
that both jang-serve and mlx-lm's server load, and server processes on loopback ports.

The tiny model is a 2-layer Llama with random (seeded) weights and a byte-level BPE tokenizer
trained on the Python docs: small enough that dozens of concurrent streams finish in seconds on
2 CPU cores, and a real model to both servers (HF safetensors + tokenizer.json + chat template).
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import numpy as np

from realdata import CACHE, python_docs_text

TINY_VERSION = 1
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@functools.lru_cache(maxsize=None)
def tiny_model_dir() -> Path:
    """An HF-format Llama folder (float32 safetensors), built once under the test cache."""
    out = CACHE / f"serve-tiny-llama-v{TINY_VERSION}"
    if (out / "config.json").exists():
        return out
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    _tokenizer(tmp)
    vocab = json.loads((tmp / "tokenizer.json").read_text())["model"]["vocab"]
    n_vocab = len(vocab) + len(SPECIALS)
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64, num_hidden_layers=2,
               intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
               vocab_size=n_vocab, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
               tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, torch_dtype="float32",
               hidden_act="silu")
    (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
    (tmp / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2]}))
    _weights(tmp, cfg)
    if out.exists():
        return out  # another process won
    tmp.rename(out)
    return out


def _tokenizer(d: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([python_docs_text()[:300_000]], trainer)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>", "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "unk_token": None, "chat_template": CHATML, "model_max_length": 2048,
        "add_bos_token": False}))


def _weights(d: Path, cfg: dict) -> None:
    from safetensors.numpy import save_file

    rng = np.random.default_rng(1234)
    h, i, v, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    hd = cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd

    def w(o, n, scale=1.0):
        return (rng.standard_normal((o, n)) * scale / np.sqrt(n)).astype(np.float32)

    t = {"model.embed_tokens.weight": w(v, h, 8.0), "model.norm.weight": np.ones(h, np.float32),
         "lm_head.weight": w(v, h, 12.0)}  # sharp logits: greedy choices far from ties
    for l in range(L):
        p = f"model.layers.{l}."
        t |= {p + "self_attn.q_proj.weight": w(q, h), p + "self_attn.k_proj.weight": w(kv, h),
              p + "self_attn.v_proj.weight": w(kv, h), p + "self_attn.o_proj.weight": w(h, q),
              p + "mlp.gate_proj.weight": w(i, h), p + "mlp.up_proj.weight": w(i, h),
              p + "mlp.down_proj.weight": w(h, i),
              p + "input_layernorm.weight": np.ones(h, np.float32),
              p + "post_attention_layernorm.weight": np.ones(h, np.float32)}
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})


def jang_serve_args(model: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "jang_serve.server.cli", "--model", str(model), "--host", "127.0.0.1",
            "--port", "{port}", "--log-level", "warning", *extra]


def mlx_lm_args(model: Path, decode_concurrency: int = 16) -> list[str]:
    return [sys.executable, "-m", "mlx_lm", "server", "--model", str(model), "--host", "127.0.0.1",
            "--port", "{port}", "--decode-concurrency", str(decode_concurrency), "--log-level", "WARNING"]


def start_jang_serve(model: Path | None = None, *extra: str, home: Path | None = None, timeout: float = 120.0):
    """jang-serve on a free loopback port (a small KV pool: it starts in seconds on CPU)."""
    import tempfile

    from jang_serve.loadgen.servers import ServerProcess

    home = home or Path(tempfile.mkdtemp(prefix="jang-home-"))
    args = jang_serve_args(model or tiny_model_dir(), "--kv-memory", "0.05", *extra)
    srv = ServerProcess(args, "jang-serve", log_path=Path(tempfile.mkstemp(prefix="jang-serve-", suffix=".log")[1]),
                        env={"JANG_SERVE_HOME": str(home), "PYTHONUNBUFFERED": "1"}, ready_path="/health")
    srv.home = home
    return srv.start(timeout)


@functools.lru_cache(maxsize=None)
def shared_jang_serve():
    """One tiny-model jang-serve for the whole test session (loadgen, soak, schemathesis); stopped at exit."""
    import atexit

    srv = start_jang_serve(None, "--max-num-seqs", "32", "--max-queue", "64", "--max-model-len", "256")
    atexit.register(srv.stop)
    return srv


def metric(url: str, name: str) -> float | None:
    """One sample of a Prometheus metric from GET /metrics (the first line that matches)."""
    import httpx

    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return None
