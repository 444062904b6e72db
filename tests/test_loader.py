"""engine.loader: Hugging Face safetensors folders (single / sharded; fp32 / bf16 / fp16), mlx-lm
quantized folders made by mlx_lm.convert, and clear errors for bad inputs.

Tiny random models are made with transformers and saved with save_pretrained; logits of our loaded
model are compared with transformers' (float) and mlx-lm's (quantized) on the same tokens."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from jang_serve.engine.attention import ContiguousBackend, ContiguousKV
from jang_serve.engine.loader import (LoadError, detect_format, iter_tensors, load_model, read_config,
                                      tensor_infos)
from jang_serve.engine.models.layers import QLinear

PROMPTS = [[5, 17, 99, 3, 250, 42, 7], [200, 1, 64]]
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


# ---------------------------------------------------------------- fixtures shared with test_jang_compat

def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_byte_tokenizer(d: Path) -> None:
    """A 256-token byte-level BPE tokenizer (no merges), as tokenizer.json + tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    b2u = _bytes_to_unicode()
    tok = Tokenizer(models.BPE(vocab={c: b for b, c in b2u.items()}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": b2u[1], "eos_token": b2u[2]}))


def make_hf(d: Path, family: str = "llama", dtype: str = "fp32", shard: bool = False, tie: bool = False,
            hidden: int = 128, seed: int = 0):
    """Save a tiny random transformers model (weights spread wider than the default init so the
    logits are far from trivial) with a byte tokenizer; returns the torch model in float32."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    kw = dict(vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              tie_word_embeddings=tie, rms_norm_eps=1e-5, head_dim=hidden // 4)
    cfg_cls, model_cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
                          "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
                          "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM)}[family]
    model = model_cls(cfg_cls(**kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (0.5 if p.ndim == 1 else 1.5 / p.shape[-1] ** 0.5))
    tdt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    model.to(tdt).save_pretrained(str(d), max_shard_size="60KB" if shard else "1GB")
    write_byte_tokenizer(d)
    return model.to(torch.float32).eval()


def our_logits(model, prompts=PROMPTS) -> list[np.ndarray]:
    """Logits [T, V] per prompt, all prompts run together as one flat batch."""
    caches = [ContiguousKV(model.num_layers) for _ in prompts]
    tokens = mx.array([t for p in prompts for t in p], dtype=mx.int32)
    positions = mx.array([i for p in prompts for i in range(len(p))], dtype=mx.int32)
    out = model(tokens, positions, ContiguousBackend(caches, [len(p) for p in prompts]))
    out = np.array(out.astype(mx.float32))
    res, at = [], 0
    for p in prompts:
        res.append(out[at: at + len(p)])
        at += len(p)
    return res


def torch_logits(model, prompts=PROMPTS) -> list[np.ndarray]:
    import torch

    with torch.no_grad():
        return [model(torch.tensor([p])).logits[0].float().numpy() for p in prompts]


# ---------------------------------------------------------------- float safetensors folders

@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("shard", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_hf_folder_matches_transformers(tmp_path, family, shard, dtype):
    import torch
    import transformers as tf

    make_hf(tmp_path, family, dtype, shard, tie=(family == "qwen2"))
    assert (tmp_path / "model.safetensors.index.json").is_file() == shard
    lm = load_model(tmp_path)  # auto -> float32 on CPU
    assert lm.format == "hf" and lm.quantization is None and lm.dtype == mx.float32
    assert lm.config["model_type"] == family
    assert lm.tokenizer is not None and lm.tokenizer.encode("hi") == [104, 105]
    # the reference: transformers on the same (rounded) checkpoint, computed in float32
    ref = tf.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    for ours, theirs in zip(our_logits(lm.model), torch_logits(ref)):
        assert np.abs(theirs).max() > 1.0  # not a trivial model
        np.testing.assert_allclose(ours, theirs, atol=2e-4, rtol=1e-4)


def test_dtype_choice_casts_every_float(tmp_path):
    make_hf(tmp_path, "llama", "fp32")
    lm = load_model(tmp_path, dtype="bfloat16")
    from mlx.utils import tree_flatten

    dts = {v.dtype for _, v in tree_flatten(lm.model.parameters())}
    assert dts == {mx.bfloat16}
    f32 = our_logits(load_model(tmp_path).model)
    bf16 = our_logits(lm.model)
    err = max(np.abs(a - b).max() / np.abs(b).max() for a, b in zip(bf16, f32))
    assert 0 < err < 0.05  # bf16 rounding, not garbage
    with pytest.raises(ValueError, match="unknown dtype"):
        load_model(tmp_path, dtype="int4")


def test_iter_tensors_streams_every_tensor(tmp_path):
    from safetensors.numpy import load_file

    make_hf(tmp_path, "qwen2", "fp32", shard=True)
    expect = {}
    for f in sorted(tmp_path.glob("model-*.safetensors")):
        expect.update(load_file(str(f)))
    got = dict(iter_tensors(tmp_path))
    assert set(got) == set(expect) and len(got) > 10
    for k, v in expect.items():
        np.testing.assert_array_equal(np.array(got[k]), v)
    infos = tensor_infos(tmp_path)
    assert infos["model.embed_tokens.weight"].shape == (256, 128)
    assert detect_format(tmp_path) == "hf"
    assert read_config(tmp_path)["rope_theta"] == 10000.0  # lifted from transformers-5 rope_parameters


def test_iter_tensors_reads_bf16(tmp_path):
    make_hf(tmp_path, "llama", "bf16")
    got = dict(iter_tensors(tmp_path))
    w = got["model.layers.0.self_attn.q_proj.weight"]
    assert w.dtype == mx.bfloat16
    ref = mx.load(str(tmp_path / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"]
    assert mx.array_equal(w, ref).item()


# ---------------------------------------------------------------- mlx-lm quantized folders

def _mixed_recipe(path, module, *args):
    if "self_attn" in path:
        return {"bits": 8, "group_size": 64}
    if path == "lm_head":
        return {"bits": 6, "group_size": 32}
    if path == "model.layers.1.mlp.down_proj":
        return False  # stays float
    return True  # the global 4-bit, group 128


def test_mlx_lm_quantized_folder_matches_mlx_lm(tmp_path):
    from mlx_lm import load as mlx_lm_load
    from mlx_lm.convert import convert

    src, dst = tmp_path / "hf", tmp_path / "mlx"
    src.mkdir()
    make_hf(src, "llama", "fp32")
    convert(str(src), str(dst), quantize=True, q_group_size=128, q_bits=4, quant_predicate=_mixed_recipe)
    assert detect_format(dst) == "mlx"
    lm = load_model(dst)
    assert lm.format == "mlx"
    mods = lm.quantization["modules"]
    assert mods["model.layers.0.self_attn.q_proj"]["bits"] == 8
    assert mods["model.layers.0.self_attn.q_proj"]["group_size"] == 64
    assert (mods["lm_head"]["bits"], mods["lm_head"]["group_size"]) == (6, 32)
    assert (mods["model.layers.0.mlp.gate_proj"]["bits"], mods["model.layers.0.mlp.gate_proj"]["group_size"]) == (4, 128)
    assert mods["model.embed_tokens"]["bits"] == 4  # quantized embedding
    assert "model.layers.1.mlp.down_proj" not in mods
    layer0 = lm.model.model.layers[0]
    assert isinstance(layer0.self_attn.q_proj, QLinear) and layer0.self_attn.q_proj.bits == 8
    assert not isinstance(lm.model.model.layers[1].mlp.down_proj, QLinear)

    ref, ref_tok = mlx_lm_load(str(dst))
    ref.set_dtype(mx.float32)
    assert lm.tokenizer.encode("hello") == ref_tok.encode("hello")
    for p, ours in zip(PROMPTS, our_logits(lm.model)):
        theirs = np.array(ref(mx.array([p]))[0].astype(mx.float32))
        np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- bad inputs

def _good(tmp_path_factory, shard=False):
    d = tmp_path_factory.mktemp("good")
    make_hf(d, "llama", "fp32", shard=shard)
    return d


def _edit_config(d: Path, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def _rewrite_weights(d: Path, fn):
    from safetensors.numpy import load_file, save_file

    w = load_file(str(d / "model.safetensors"))
    save_file(fn(w), str(d / "model.safetensors"))


def _truncate(f: Path, keep: float):
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * keep)])


def _case_missing_path(d):
    return d / "nope", "nope", "no such file"


def _case_missing_config(d):
    (d / "config.json").unlink()
    return d, "config.json", "missing"


def _case_bad_json(d):
    (d / "config.json").write_text('{"model_type": "llama",')
    return d, "config.json", "bad JSON"


def _case_unknown_model_type(d):
    _edit_config(d, model_type="gpt17")
    return d, "config.json", "unknown model_type 'gpt17'; supported: "


def _case_truncated(d):
    _truncate(d / "model.safetensors", 0.6)
    return d, "model.safetensors", "truncated"


def _case_corrupt_header(d):
    (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + b"\0" * 64)
    return d, "model.safetensors", "corrupt safetensors"


def _case_tiny_file(d):
    (d / "model.safetensors").write_bytes(b"abc")
    return d, "model.safetensors", "truncated or corrupt"


def _case_no_weights(d):
    (d / "model.safetensors").unlink()
    return d, str(d), "no weight files"


def _case_shape_mismatch(d):
    _edit_config(d, intermediate_size=320)
    return d, "model.safetensors", ("mismatched shapes: parameter model.layers.0.mlp.gate_proj.weight expected [320, 128] "
                                    "(from config.json), got [256, 128]")


def _case_missing_param(d):
    _rewrite_weights(d, lambda w: {k: v for k, v in w.items() if k != "model.layers.1.mlp.up_proj.weight"})
    return d, str(d), "missing parameters: model.layers.1.mlp.up_proj.weight"


def _case_unexpected_tensor(d):
    _rewrite_weights(d, lambda w: {**w, "model.layers.0.extra.weight": np.zeros(3, np.float32)})
    return d, "model.safetensors", "unexpected tensors not in the llama model: model.layers.0.extra.weight"


def _case_unsupported_quant(d):
    _edit_config(d, quantization={"bits": 4, "group_size": 32, "mode": "mxfp4"})
    return d, "config.json", "unsupported quantization mode 'mxfp4'"


def _case_gptq_checkpoint(d):
    _edit_config(d, quantization_config={"quant_method": "gptq", "bits": 4, "group_size": 128})
    return d, "config.json", "unsupported quantization method 'gptq'"


def _case_not_a_model(d):
    f = d / "notes.txt"
    f.write_text("hello")
    return f, "notes.txt", "not a model"


def _case_truncated_gguf(d):
    from realdata import smollm2_gguf

    f = d / "small.gguf"
    with open(smollm2_gguf(), "rb") as src:
        f.write_bytes(src.read(5000))
    return f, "small.gguf", "truncated or corrupt GGUF"


BAD = [_case_truncated_gguf, _case_missing_path, _case_missing_config, _case_bad_json, _case_unknown_model_type, _case_truncated,
       _case_corrupt_header, _case_tiny_file, _case_no_weights, _case_shape_mismatch, _case_missing_param,
       _case_unexpected_tensor, _case_unsupported_quant, _case_gptq_checkpoint, _case_not_a_model]


def _case_missing_shard(d):
    shard = sorted(d.glob("model-*.safetensors"))[1]
    shard.unlink()
    return d, shard.name, "missing shard (listed in model.safetensors.index.json"


def _case_unlisted_tensor(d):
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    first = sorted(d.glob("model-*.safetensors"))[0].name
    idx["weight_map"]["model.layers.0.mlp.ghost.weight"] = first
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    return d, first, "tensor 'model.layers.0.mlp.ghost.weight' is listed for this shard"


def _case_bad_index(d):
    (d / "model.safetensors.index.json").write_text("[1, 2")
    return d, "model.safetensors.index.json", "bad JSON"


def _case_truncated_shard(d):
    shard = sorted(d.glob("model-*.safetensors"))[-1]
    _truncate(shard, 0.5)
    return d, shard.name, "truncated"


BAD_SHARDED = [_case_missing_shard, _case_unlisted_tensor, _case_bad_index, _case_truncated_shard]


@pytest.fixture(scope="module")
def good_single(tmp_path_factory):
    return _good(tmp_path_factory)


@pytest.fixture(scope="module")
def good_sharded(tmp_path_factory):
    return _good(tmp_path_factory, shard=True)


def _check_bad(case, src, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(src, d)
    path, file_part, problem = case(d)
    with pytest.raises(LoadError) as e:
        load_model(path)
    msg = str(e.value)
    assert file_part in msg and problem in msg, msg
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize("case", BAD, ids=[c.__name__[6:] for c in BAD])
def test_bad_input_names_file_and_problem(case, good_single, tmp_path):
    _check_bad(case, good_single, tmp_path)


@pytest.mark.parametrize("case", BAD_SHARDED, ids=[c.__name__[6:] for c in BAD_SHARDED])
def test_bad_sharded_input_names_file_and_problem(case, good_sharded, tmp_path):
    _check_bad(case, good_sharded, tmp_path)


def test_mlx_lm_quantized_moe_matches_mlx_lm(tmp_path):
    """Stacked experts (switch_mlp) load as QSwitchLinear with their own bits; router kept 8-bit."""
    import torch
    import transformers as tf
    from mlx_lm import load as mlx_lm_load
    from mlx_lm.convert import convert

    torch.manual_seed(0)
    src, dst = tmp_path / "hf", tmp_path / "mlx"
    cfg = tf.Qwen3MoeConfig(vocab_size=256, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
                            num_experts=4, num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=32, decoder_sparse_step=1, mlp_only_layers=[],
                            norm_topk_prob=True)
    model = tf.Qwen3MoeForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else torch.randn_like(p) * 1.5 / p.shape[-1] ** 0.5)
    model.save_pretrained(str(src))
    write_byte_tokenizer(src)
    # mlx-lm 0.32 reads the pre-transformers-5 key names
    c = json.loads((src / "config.json").read_text())
    c.update(num_experts=4, rope_theta=10000.0)
    (src / "config.json").write_text(json.dumps(c))
    convert(str(src), str(dst), quantize=True, q_group_size=64, q_bits=4,
            quant_predicate=lambda p, m, *a: {"bits": 8, "group_size": 32} if "gate_proj" in p or p.endswith("mlp.gate") else True)
    lm = load_model(dst)
    mods = lm.quantization["modules"]
    assert (mods["model.layers.0.mlp.switch_mlp.gate_proj"]["bits"], mods["model.layers.0.mlp.switch_mlp.gate_proj"]["group_size"]) == (8, 32)
    assert (mods["model.layers.1.mlp.switch_mlp.down_proj"]["bits"], mods["model.layers.1.mlp.switch_mlp.down_proj"]["group_size"]) == (4, 64)
    assert type(lm.model.model.layers[0].mlp.switch_mlp.up_proj).__name__ == "QSwitchLinear"
    ref, _ = mlx_lm_load(str(dst))
    ref.set_dtype(mx.float32)
    for p, ours in zip(PROMPTS, our_logits(lm.model)):
        theirs = np.array(ref(mx.array([p]))[0])
        assert np.abs(theirs).max() > 0.5
        np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)


def test_gguf_paths_are_detected_and_read(tmp_path):
    from realdata import smollm2_gguf

    g = smollm2_gguf()
    assert detect_format(g) == "gguf"
    cfg = read_config(g)  # metadata only, no weights read
    assert cfg["model_type"] == "llama" and cfg["num_hidden_layers"] == 30 and cfg["hidden_size"] == 576
    (tmp_path / "m.gguf").symlink_to(g)
    assert detect_format(tmp_path) == "gguf"  # a folder holding one .gguf and no config.json
