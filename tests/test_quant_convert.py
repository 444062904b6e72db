"""convert(): roles, profiles, the JANG v2 bundle layout, bit accounting, bad input, and loading
the bundle with the reference `jang` loader and mlx-lm (same logits as our model)."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from jang_serve.quantize import PROFILES, ConvertResult, ProfileError, SourceError, convert
from jang_serve.quantize.bundle import forward_logits, load_bundle
from jang_serve.quantize.profiles import FIXED_PROFILES
from jang_serve.quantize.roles import Role, role

IDS = [5, 17, 42, 99, 3, 250, 7, 8, 9, 10, 11, 200]


def _tokenizer(out: Path, vocab: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tr = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["hello world, a tiny tokenizer for tests; def f(x): return x + 1"] * 20, tr)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
        "chat_template": "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"}))


def make_tiny(out: Path, model_type: str = "llama", tie: bool = False, hidden: int = 128, layers: int = 2,
              inter: int = 256, vocab: int = 320, seed: int = 0, experts: int = 0) -> Path:
    """A small random HF-layout checkpoint (bf16 safetensors + config + tokenizer)."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    heads, kv, hd = 4, 2, hidden // 4
    cfg = {"model_type": model_type, "architectures": ["X"], "hidden_size": hidden, "intermediate_size": inter,
           "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
           "head_dim": hd, "vocab_size": vocab, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
           "max_position_embeddings": 512, "tie_word_embeddings": tie, "hidden_act": "silu"}
    if experts:
        cfg.update({"num_experts": experts, "num_experts_per_tok": 2, "moe_intermediate_size": inter // 2,
                    "decoder_sparse_step": 1, "norm_topk_prob": True, "mlp_only_layers": []})
    w = {}

    def lin(name, o, i, bias=False):
        w[name + ".weight"] = rng.normal(0, i**-0.5, (o, i))
        if bias:
            w[name + ".bias"] = rng.normal(0, 0.02, (o,))

    w["model.embed_tokens.weight"] = rng.normal(0, 1.0, (vocab, hidden))
    for i in range(layers):
        p = f"model.layers.{i}."
        b = model_type == "qwen2"
        lin(p + "self_attn.q_proj", heads * hd, hidden, b)
        lin(p + "self_attn.k_proj", kv * hd, hidden, b)
        lin(p + "self_attn.v_proj", kv * hd, hidden, b)
        lin(p + "self_attn.o_proj", hidden, heads * hd)
        if model_type == "qwen3":
            w[p + "self_attn.q_norm.weight"] = np.ones(hd)
            w[p + "self_attn.k_norm.weight"] = np.ones(hd)
        if experts:
            lin(p + "mlp.gate", experts, hidden)
            for e in range(experts):
                for n, (o, ii) in {"gate_proj": (inter // 2, hidden), "up_proj": (inter // 2, hidden),
                                   "down_proj": (hidden, inter // 2)}.items():
                    lin(p + f"mlp.experts.{e}.{n}", o, ii)
        else:
            lin(p + "mlp.gate_proj", inter, hidden)
            lin(p + "mlp.up_proj", inter, hidden)
            lin(p + "mlp.down_proj", hidden, inter)
        w[p + "input_layernorm.weight"] = 1 + rng.normal(0, 0.05, (hidden,))
        w[p + "post_attention_layernorm.weight"] = 1 + rng.normal(0, 0.05, (hidden,))
    w["model.norm.weight"] = np.ones(hidden)
    if not tie:
        lin("lm_head", vocab, hidden)
    mx.save_safetensors(str(out / "model.safetensors"),
                        {k: mx.array(v.astype(np.float32)).astype(mx.bfloat16) for k, v in w.items()},
                        metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg))
    _tokenizer(out, vocab)
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("src") / "tiny")


def test_roles_by_name():
    assert role("model.layers.3.self_attn.q_proj.weight", (64, 64)) is Role.CRITICAL
    assert role("lm_head.weight", (100, 64)) is Role.CRITICAL
    assert role("model.embed_tokens.weight", (100, 64)) is Role.IMPORTANT
    assert role("model.layers.0.mlp.down_proj.weight", (64, 128)) is Role.COMPRESS
    assert role("model.layers.0.mlp.switch_mlp.up_proj.weight", (4, 64, 64), moe=True) is Role.COMPRESS
    assert role("model.layers.0.block_sparse_moe.switch_mlp.down_proj.weight", (4, 64, 64), moe=True) is Role.COMPRESS
    assert role("model.layers.0.mlp.shared_expert.up_proj.weight", (64, 64), moe=True) is Role.CRITICAL
    assert role("model.layers.0.mlp.down_proj.weight", (64, 128), moe=True) is Role.CRITICAL  # dense MLP in MoE
    assert role("model.layers.0.self_attn.qkv_proj.weight", (192, 64)) is Role.CRITICAL  # phi3
    assert role("model.layers.0.mlp.gate_up_proj.weight", (256, 64)) is Role.COMPRESS  # phi3
    assert role("model.layers.0.linear_attn.in_proj_qkvz.weight", (256, 64)) is Role.IMPORTANT
    for skipped in ("model.layers.0.mlp.gate.weight", "model.layers.0.block_sparse_moe.gate.weight",
                    "model.norm.weight", "model.layers.0.self_attn.q_proj.bias",
                    "model.layers.0.self_attn.q_norm.weight"):
        assert role(skipped, (8, 64), moe=True) is None, skipped
    assert role("model.layers.0.input_layernorm.weight", (64,)) is None


def test_profiles_and_bad_budget():
    assert len(FIXED_PROFILES) == 11 and FIXED_PROFILES["JANG_2S"] == (6, 4, 2)
    assert FIXED_PROFILES["JANG_4M"] == (8, 4, 4) and FIXED_PROFILES["JANG_6M"] == (8, 6, 6)
    assert {"JANG_2K", "JANG_3K", "JANG_4K", "JANG_5K", "JANG_6K"} <= set(PROFILES)


def _tree(p: Path) -> list[str]:
    return sorted(x.name for x in p.iterdir())


def test_bad_input_leaves_nothing(tiny, tmp_path):
    out = tmp_path / "o"
    with pytest.raises(ProfileError, match="unknown profile"):
        convert(tiny, out, profile="JANG_9Z")
    with pytest.raises(ProfileError, match="between 2 and 8"):
        convert(tiny, out, bits=1.5)
    with pytest.raises(ProfileError, match="between 2 and 8"):
        convert(tiny, out, bits=9)
    with pytest.raises(ValueError, match="method"):
        convert(tiny, out, profile="JANG_4M", method="awq")
    with pytest.raises(SourceError, match="no such file"):
        convert(tmp_path / "missing", out, profile="JANG_4M")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    with pytest.raises(SourceError, match="config.json"):
        convert(bad, out, profile="JANG_4M")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"nope" * 10)
    with pytest.raises(SourceError):
        convert(junk, out, profile="JANG_4M")
    exists = tmp_path / "exists"
    exists.mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        convert(tiny, exists, profile="JANG_4M")
    assert _tree(tmp_path) == ["bad", "exists", "junk.gguf"]  # no output, no temp folder left


def test_bundle_layout_and_bits(tiny, tmp_path):
    seen = []
    r = convert(tiny, tmp_path / "b", profile="JANG_2S", progress=seen.append)
    assert isinstance(r, ConvertResult) and r.path == tmp_path / "b" and r.method == "rtn"
    assert seen and seen[-1]["fraction"] == 1.0 and all({"fraction", "tensor", "eta_s", "message"} <= set(d) for d in seen)
    files = _tree(r.path)
    assert "model-00001-of-00001.safetensors" in files and "tokenizer.json" in files
    assert not [f for f in files if "partial" in f]
    index = json.loads((r.path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["format"] == "jang"
    cfg = json.loads((r.path / "config.json").read_text())
    q = cfg["quantization"]
    assert q["group_size"] == 64 and q["bits"] == 2
    assert q["model.layers.0.self_attn.q_proj"]["bits"] == 6  # CRITICAL
    assert q["model.embed_tokens"]["bits"] == 4  # IMPORTANT
    assert q["model.layers.1.mlp.up_proj"]["bits"] == 2  # COMPRESS
    assert "model.norm" not in q
    jc = json.loads((r.path / "jang_config.json").read_text())
    assert jc["format"] == "jang" and jc["format_version"] == "2.0"
    jq = jc["quantization"]
    assert jq["profile"] == "JANG_2S" and jq["method"] == "rtn"
    # honest bits: recount from the stored tensors
    w = {}
    for f in r.path.glob("*.safetensors"):
        w.update(mx.load(str(f)))
    n = stored = 0
    for k, v in w.items():
        if k.endswith(".weight") and v.ndim >= 2:
            base = k[: -len(".weight")]
            if base + ".scales" in w:
                bits = q[base]["bits"]
                n += v.size * 32 // bits
                stored += 8 * (v.nbytes + w[base + ".scales"].nbytes + w[base + ".biases"].nbytes)
            else:
                n += v.size
                stored += 8 * v.nbytes
    assert abs(stored / n - jq["actual_bits"]) < 1e-3 and abs(r.average_bits - jq["actual_bits"]) < 1e-3
    assert jq["nominal_bits"] == pytest.approx(jq["actual_bits"] - 0.5, abs=1e-3)  # fp16 scale+bias per 64
    assert w["model.layers.0.input_layernorm.weight"].dtype == mx.float16
    assert set(jq["tensor_quantization_manifest"]) == {k for k in q if isinstance(q[k], dict)}
    assert r.size_bytes == sum(f.stat().st_size for f in r.path.glob("*.safetensors"))


def test_sharding(tiny, tmp_path, monkeypatch):
    from jang_serve.quantize import writer

    monkeypatch.setattr(writer, "MAX_SHARD_BYTES", 60_000)
    monkeypatch.setattr(writer.BundleWriter.__init__, "__defaults__", (60_000,))
    r = convert(tiny, tmp_path / "s", profile="JANG_4S")
    shards = sorted(r.path.glob("model-*.safetensors"))
    assert len(shards) > 2
    n = len(shards)
    assert [s.name for s in shards] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((r.path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    a, _ = load_bundle(r.path)
    assert forward_logits(a, IDS).shape == (len(IDS), 320)


@pytest.mark.parametrize("model_type,tie,experts", [("qwen2", True, 0), ("qwen3_moe", False, 4)])
def test_other_families_round_trip(tmp_path, model_type, tie, experts):
    src = make_tiny(tmp_path / "src", model_type=model_type, tie=tie, experts=experts, seed=3)
    r = convert(src, tmp_path / "out", profile="JANG_4L", method="mse")
    cfg = json.loads((r.path / "config.json").read_text())
    if experts:
        assert cfg["quantization"]["model.layers.0.mlp.switch_mlp.gate_proj"]["bits"] == 4
        assert "model.layers.0.mlp.gate" not in cfg["quantization"]  # router stays float
    if tie:
        assert "lm_head" not in cfg["quantization"]
        assert cfg["quantization"]["model.embed_tokens"]["bits"] == 6
    qm, _ = load_bundle(r.path)
    fm, _ = load_bundle(src)
    a, b = forward_logits(qm, IDS), forward_logits(fm, IDS)
    rel = float(mx.sqrt(mx.mean((a - b) ** 2)) / mx.sqrt(mx.mean(b**2)))
    assert rel < 0.15, rel


def test_loads_in_reference_jang_and_mlx_lm_with_same_logits(tiny, tmp_path):
    r = convert(tiny, tmp_path / "m", profile="JANG_3L", method="mse")
    ours_model, _ = load_bundle(r.path)
    ours = forward_logits(ours_model, IDS)
    import mlx_lm
    from jang_tools.loader import load_jang_model

    from jang_serve.engine.loader import load_model

    lm = load_model(r.path, dtype="float32")  # our engine's loader
    assert lm.format == "jang"
    assert float(mx.abs(forward_logits(lm.model, IDS) - ours).max()) < 1e-5
    for loader in (mlx_lm.load, load_jang_model):
        m, tok = loader(str(r.path))
        m.set_dtype(mx.float32)
        theirs = m(mx.array([IDS]))[0].astype(mx.float32)
        assert float(mx.abs(theirs - ours).max()) < 2e-3
        assert tok.encode("hello world")  # tokenizer files made it into the bundle
    # and the quantized model is close to, but not the same as, the float one
    fm, _ = load_bundle(tiny)
    diff = float(mx.abs(forward_logits(fm, IDS) - ours).max())
    assert 1e-4 < diff < 1.0


def test_profile_options_and_default_serve_profile(tiny, tmp_path):
    from jang_serve.quantize import DEFAULT_SERVE_PROFILE
    from jang_serve.quantize.profiles import resolve

    p = resolve("jang_4m:mse:g32")
    assert (p.profile, p.method, p.group_size, p.triplet) == ("JANG_4M", "mse", 32, (8, 4, 4))
    with pytest.raises(ProfileError, match="unknown profile option"):
        resolve("JANG_4M:fast")
    r = convert(tiny, tmp_path / "d", profile=DEFAULT_SERVE_PROFILE)
    jq = json.loads((r.path / "jang_config.json").read_text())["quantization"]
    base = resolve(DEFAULT_SERVE_PROFILE)
    assert jq["method"] == (base.method or "rtn") and jq["group_size"] == (base.group_size or 64)
    # an explicit argument wins over the profile's option
    r2 = convert(tiny, tmp_path / "e", profile="JANG_4M:mse:g32", method="rtn", group_size=64)
    assert r2.method == "rtn" and json.loads((r2.path / "config.json").read_text())["quantization"]["group_size"] == 64
