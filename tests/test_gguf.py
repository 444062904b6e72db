"""GGUF import: SmolLM2 perplexity vs transformers' own GGUF-dequantized model, config from
metadata, the q/k permutation undone, Gemma-3 and Qwen2.5 logits vs transformers, bad files.

transformers' outputs are cached under .cache/tests/refs (see gguf_ref.py): its GGUF reader needs
minutes on this machine, so only the first run pays for it."""

from __future__ import annotations

import functools
import json
import math

import mlx.core as mx
import numpy as np
import pytest

import gguf_ref
import realdata
from jang_serve.engine.attention import ContiguousBackend, ContiguousKV
from jang_serve.engine.loader.gguf import GGUFError, load_gguf_model, read_gguf
from jang_serve.engine.loader.gguf_config import llama3_rope_from_freqs

PPL_TOKENS, PPL_WINDOW = 4096, 512


@functools.lru_cache(maxsize=1)
def _hf_model(name: str):
    import torch
    from transformers import AutoModelForCausalLM

    p = gguf_ref.gguf_path(name)
    return AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32).eval()


def _forward(model, seqs: list[list[int]]) -> mx.array:
    """Logits for several sequences at once, as one flat batch over contiguous caches."""
    caches = [ContiguousKV(model.num_layers) for _ in seqs]
    backend = ContiguousBackend(caches, [len(s) for s in seqs])
    tokens = mx.array([t for s in seqs for t in s], dtype=mx.int32)
    positions = mx.array([p for s in seqs for p in range(len(s))], dtype=mx.int32)
    return model(tokens, positions, backend)


def _window_nll(model, windows) -> np.ndarray:
    """NLL of tokens 1.. of each window given the tokens before (token 0 is context only)."""
    nll = []
    for w in windows:
        logits = _forward(model, [w])[:-1]
        lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        nll.append(np.array(-mx.take_along_axis(lp, mx.array(w[1:])[:, None], axis=-1)[:, 0]))
    return np.stack(nll)


@pytest.fixture(scope="module")
def smollm2():
    return load_gguf_model(gguf_ref.gguf_path("smollm2"))


def _ppl_tokens(tok) -> list[int]:
    text = realdata.python_docs_text()[:60_000]
    ids = tok.encode(text)
    assert len(ids) >= PPL_TOKENS
    return ids[:PPL_TOKENS]


def test_smollm2_perplexity_matches_transformers(smollm2):
    model, config, tok = smollm2
    ids = _ppl_tokens(tok)
    windows = [ids[i : i + PPL_WINDOW] for i in range(0, PPL_TOKENS, PPL_WINDOW)]

    nll = _window_nll(model, windows)  # fast with the OpenBLAS that conftest (jang_serve) preloads

    def reference():
        import torch

        hf = _hf_model("smollm2")
        out = []
        with torch.no_grad():
            for w in windows:
                lp = torch.log_softmax(hf(torch.tensor([w])).logits[0, :-1].float(), -1)
                out.append(-lp.gather(1, torch.tensor(w[1:])[:, None])[:, 0].numpy())
        return {"nll": np.stack(out)}

    ref = gguf_ref.cached_npz("smollm2", "ppl-nll", ids, reference)["nll"]
    ppl, ppl_ref = math.exp(nll.mean()), math.exp(ref.mean())
    result = {"model": "SmolLM2-135M-Instruct.Q4_1.gguf", "tokens": PPL_TOKENS, "window": PPL_WINDOW,
              "scored_tokens": int(nll.size), "ppl_ours": ppl, "ppl_transformers": ppl_ref,
              "rel_diff": ppl / ppl_ref - 1, "max_abs_nll_diff": float(np.abs(nll - ref).max())}
    out = realdata.CACHE / "gguf_ppl_smollm2.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(result)
    assert nll.shape == (PPL_TOKENS // PPL_WINDOW, PPL_WINDOW - 1)
    assert abs(ppl / ppl_ref - 1) < 0.01, result
    assert np.abs(nll - ref).max() < 0.05, result  # per token too, not just on average
    assert 1.5 < ppl < 200  # a working model on English prose/code, not noise (uniform would be 49152)


def test_config_from_metadata():
    """Every hyper-parameter comes from the metadata, read independently here with gguf.GGUFReader."""

    def metadata():
        from gguf import GGUFReader

        r = GGUFReader(gguf_ref.gguf_path("smollm2"))
        keys = ["llama.context_length", "llama.embedding_length", "llama.block_count", "llama.feed_forward_length",
                "llama.attention.head_count", "llama.attention.head_count_kv", "llama.rope.freq_base",
                "llama.attention.layer_norm_rms_epsilon", "llama.vocab_size", "tokenizer.ggml.bos_token_id"]
        return {k: r.fields[k].contents() for k in keys} | {"has_output": any(t.name == "output.weight" for t in r.tensors)}

    md = gguf_ref.cached_json("smollm2", "metadata", "v1", metadata)
    cfg = gguf_ref.ours("smollm2").config
    assert cfg["model_type"] == "llama"
    assert cfg["max_position_embeddings"] == md["llama.context_length"]
    assert cfg["hidden_size"] == md["llama.embedding_length"]
    assert cfg["num_hidden_layers"] == md["llama.block_count"]
    assert cfg["intermediate_size"] == md["llama.feed_forward_length"]
    assert cfg["num_attention_heads"] == md["llama.attention.head_count"]
    assert cfg["num_key_value_heads"] == md["llama.attention.head_count_kv"]
    assert cfg["rope_theta"] == md["llama.rope.freq_base"]
    assert np.float32(cfg["rms_norm_eps"]) == np.float32(md["llama.attention.layer_norm_rms_epsilon"])
    assert cfg["vocab_size"] == md["llama.vocab_size"]
    assert cfg["tie_word_embeddings"] == (not md["has_output"])
    assert cfg["bos_token_id"] == md["tokenizer.ggml.bos_token_id"]
    assert cfg["head_dim"] == cfg["hidden_size"] // cfg["num_attention_heads"]


def test_gemma3_and_qwen2_configs():
    g = gguf_ref.ours("gemma3").config
    assert g["model_type"] == "gemma3_text"
    assert (g["head_dim"], g["sliding_window"], g["rope_theta"], g["query_pre_attn_scalar"]) == (256, 512, 1e6, 256)
    assert g["layer_types"].count("full_attention") == g["num_hidden_layers"] // 6
    assert g["tie_word_embeddings"] and g["rms_norm_eps"] == 1e-6
    q = gguf_ref.ours("qwen25").config
    assert q["model_type"] == "qwen2" and not q["tie_word_embeddings"]  # this file has its own output.weight
    assert (q["num_attention_heads"], q["num_key_value_heads"], q["rope_theta"]) == (14, 2, 1e6)


def test_qk_permutation_undone(smollm2):
    model = smollm2[0]

    def reference():
        hf = _hf_model("smollm2")
        at = hf.model.layers[3].self_attn
        return {"q": at.q_proj.weight.detach().numpy(), "k": at.k_proj.weight.detach().numpy()}

    ref = gguf_ref.cached_npz("smollm2", "qk-layer3", "v1", reference)
    attn = model.model.layers[3].self_attn
    np.testing.assert_array_equal(np.array(attn.q_proj.weight), ref["q"])
    np.testing.assert_array_equal(np.array(attn.k_proj.weight), ref["k"])
    # and the raw GGUF rows really are permuted (the test would pass trivially otherwise)
    from jang_serve.engine.loader.gguf_file import GGUFFile

    raw = GGUFFile(gguf_ref.gguf_path("smollm2")).float32("blk.3.attn_q.weight")
    assert not np.array_equal(raw, ref["q"])


def test_unpermute_inverts_llama_cpp_permute():
    from jang_serve.engine.loader.gguf import _unpermute

    heads, hd, cols = 3, 8, 5
    w = np.random.default_rng(0).standard_normal((heads * hd, cols)).astype(np.float32)
    # llama.cpp convert_hf_to_gguf.py: reshape(n_head, 2, hd//2, ...).swapaxes(1, 2)
    permuted = w.reshape(heads, 2, hd // 2, cols).swapaxes(1, 2).reshape(w.shape)
    np.testing.assert_array_equal(_unpermute(permuted, heads), w)


def test_llama3_rope_freqs_recovered():
    dims, base = 128, 500000.0
    cfg = {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    factors = []
    for i in range(0, dims, 2):
        wl = 2 * math.pi * base ** (i / dims)
        if wl < 8192 / 4:
            factors.append(1.0)
        elif wl > 8192:
            factors.append(32.0)
        else:
            s = (8192 / wl - 1) / 3
            factors.append(1 / ((1 - s) / 32 + s))
    got = llama3_rope_from_freqs(np.array(factors, dtype=np.float32), base, dims)
    assert got == {"rope_type": "llama3", **cfg}
    assert llama3_rope_from_freqs(np.linspace(1, 3, dims // 2), base, dims) is None


PROMPT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"


@pytest.mark.parametrize("name", ["gemma3", "qwen25"])
def test_logits_match_transformers(name):
    model, config, tok = load_gguf_model(gguf_ref.gguf_path(name))
    ids = tok.encode(PROMPT, add_special_tokens=True)
    ours = np.array(_forward(model, [ids]))

    def reference():
        import torch

        with torch.no_grad():
            return {"logits": _hf_model(name)(torch.tensor([ids])).logits[0].float().numpy()}

    ref = gguf_ref.cached_npz(name, "logits", ids, reference)["logits"]
    assert ours.shape == ref.shape
    diff = np.abs(ours - ref).max()
    assert diff < 2e-3 * np.abs(ref).max(), (name, diff)
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() > 0.95


def test_gemma_norms_shifted():
    """llama.cpp stores Gemma norms as 1 + w; we hand HF's w to the model."""
    from jang_serve.engine.loader.gguf_file import GGUFFile

    g = read_gguf(gguf_ref.gguf_path("gemma3"))
    raw = GGUFFile(gguf_ref.gguf_path("gemma3")).float32("blk.0.attn_norm.weight")
    np.testing.assert_allclose(np.array(g.weights["model.layers.0.input_layernorm.weight"]), raw - 1.0)
    assert "model.layers.0.pre_feedforward_layernorm.weight" in g.weights
    assert "model.layers.0.post_feedforward_layernorm.weight" in g.weights


def test_bad_files(tmp_path):
    with pytest.raises(GGUFError, match="no such GGUF file"):
        read_gguf(tmp_path / "missing.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + bytes(64))
    with pytest.raises(GGUFError, match="bad.gguf.*not a GGUF file"):
        read_gguf(bad)
    src = gguf_ref.gguf_path("smollm2").read_bytes()
    trunc = tmp_path / "trunc.gguf"
    trunc.write_bytes(src[: len(src) // 2])
    with pytest.raises(GGUFError, match="trunc.gguf.*(truncated|past the end)"):
        read_gguf(trunc)
    short = tmp_path / "short.gguf"
    short.write_bytes(src[:5000])
    with pytest.raises(GGUFError, match="short.gguf"):
        read_gguf(short)
