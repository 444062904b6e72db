"""Tensor parallelism (engine/distributed): sharding exactness in process, then real 2-rank groups on
the ring backend over loopback: greedy outputs equal the single-process engine (tiny random models,
float and quantized, and SmolLM2), a killed rank gives a clear error, and `jang-serve --tp 2` over HTTP.

The multi-process cases run this file as a driver (`python tests/test_tp.py MODE PATH`): one process
computes the single-process reference, then becomes rank 0 of a 2-rank group (one group per process).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jang_serve  # noqa: F401  (first: it gives MLX a fast BLAS, also when this file runs as the driver)

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import mlx.core as mx  # noqa: E402
import pytest  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from jang_serve.engine.distributed.sharding import ShardError, head_split, shard_model  # noqa: E402
from jang_serve.engine.models.layers import quantize_model  # noqa: E402

BLOCKS = 96


# -- model folders ---------------------------------------------------------------------------------
def _q4(path, m):
    return (4, 32)


def save_model(model, cfg: dict, out: Path, quant: tuple[int, int] | None = None, tokenizer=None) -> Path:
    """An mlx-style folder: config.json (+ quantization) and model.safetensors (+ tokenizer)."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = dict(cfg)
    if quant:
        quantize_model(model, lambda p, m: quant)
        cfg["quantization"] = {"bits": quant[0], "group_size": quant[1]}
    mx.eval(model.parameters())
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (out / "config.json").write_text(json.dumps(cfg))
    if tokenizer is not None:
        tokenizer.save(out)
    return out


def tiny_dir(tmp: Path, quant=None, **kw) -> Path:
    from engine_helpers import tiny_model

    model, cfg = tiny_model(3, **kw)
    return save_model(model, cfg, tmp / ("tiny-q" if quant else "tiny"), quant)


# -- in-process: how the weights are cut ----------------------------------------------------------
def test_head_split_groups_uneven_and_replicated():
    assert head_split(9, 3, 2, 0) == (0, 3, 0, 1)  # SmolLM2: uneven, by GQA group
    assert head_split(9, 3, 2, 1) == (3, 9, 1, 3)
    assert head_split(4, 1, 2, 1) == (2, 4, 0, 1)  # fewer KV heads than ranks: replicated
    assert head_split(8, 2, 4, 3) == (6, 8, 1, 2)
    assert head_split(32, 8, 4, 2) == (16, 24, 4, 6)
    with pytest.raises(ShardError, match="cannot split 12 query heads / 4 KV heads over 5 ranks"):
        head_split(12, 4, 5, 2)
    with pytest.raises(ShardError, match="cannot split 3 over 4 ranks"):
        head_split(3, 1, 4, 0)


def _params(model) -> dict:
    return {k: v for k, v in tree_flatten(model.parameters())}


def test_quantized_shards_are_exact_before_or_after_quantization():
    """Sharding the packed weights on group boundaries == sharding the float weights, then quantizing."""
    from engine_helpers import tiny_model

    for rank in range(2):
        a, _ = tiny_model(5, intermediate_size=256)
        quantize_model(a, _q4)
        shard_model(a, None, rank, 2)
        b, _ = tiny_model(5, intermediate_size=256)
        shard_model(b, None, rank, 2)
        quantize_model(b, _q4)
        pa, pb = _params(a), _params(b)
        assert set(pa) == set(pb)
        for k, v in pa.items():
            assert mx.array_equal(v, pb[k]), k
        attn = a.model.layers[0].self_attn
        assert (attn.n_heads, attn.n_kv) == (2, 1) and a.kv_heads == 1
        assert a.model.layers[0].mlp.gate_proj.output_dims == 128
        # a rank holds half of the vocabulary rows of the (quantized) embedding, packed bytes untouched
        assert pa["model.embed_tokens.local.weight"].shape == (128, 64 * 4 // 32)


def test_a_shard_frees_the_rest_of_the_weights():
    """Each rank keeps about 1/size of the weights: the slices own their memory (no views)."""
    import gc

    from engine_helpers import tiny_model

    model, _ = tiny_model(6, hidden_size=256, intermediate_size=1024, vocab_size=4096, num_attention_heads=8,
                          num_key_value_heads=4)
    gc.collect()
    mx.clear_cache()
    full = mx.get_active_memory()
    shard_model(model, None, 1, 2)
    gc.collect()
    mx.clear_cache()
    assert mx.get_active_memory() < 0.6 * full, (mx.get_active_memory(), full)


def test_bad_splits_say_why():
    from engine_helpers import tiny_model

    model, _ = tiny_model(5)
    quantize_model(model, lambda p, m: (4, 64))
    with pytest.raises(ShardError, match="input columns 0..32 do not fall on the quantization groups of 64"):
        shard_model(model, None, 0, 2)  # o_proj: 2 heads x 16 = 32 columns per rank, groups of 64
    with pytest.raises(ShardError, match="rank 2 is not one of the 2 ranks 0..1"):
        shard_model(tiny_model(5)[0], None, 2, 2)


def test_fused_and_expert_weights_are_cut_per_rank():
    """phi3's fused qkv / gate_up rows and every expert of a MoE keep this rank's slice only."""
    from engine_helpers import tiny_model

    phi, _ = tiny_model(2, model_type="phi3")
    full = phi.model.layers[0].self_attn.qkv_proj.weight
    shard_model(phi, None, 1, 2)
    a = phi.model.layers[0].self_attn
    assert a.qkv_proj.weight.shape == (64, 64) and (a.n_heads, a.n_kv) == (2, 1)
    assert mx.array_equal(a.qkv_proj.weight[:32], full[32:64])  # q heads 2, 3
    assert mx.array_equal(a.qkv_proj.weight[32:48], full[64 + 16:96])  # k head 1
    assert phi.model.layers[0].mlp.gate_up_proj.weight.shape == (128, 64)
    moe, _ = tiny_model(2, model_type="mixtral", num_local_experts=4, num_experts_per_tok=2)
    quantize_model(moe, _q4)
    down = moe.model.layers[0].block_sparse_moe.switch_mlp.down_proj
    shard_model(moe, None, 0, 2)
    sw = moe.model.layers[0].block_sparse_moe.inner.switch_mlp
    assert sw.gate_proj.weight.shape == (4, 64, 64 * 4 // 32)  # 4 experts x half of 128 rows
    assert mx.array_equal(sw.down_proj.weight, down.weight[:, :, :64 * 4 // 32])
    assert mx.array_equal(sw.down_proj.scales, down.scales[:, :, :2])


# -- shard-aware loading: each rank reads only its own slices -----------------------------------
def _same_params(a, b) -> None:
    pa, pb = _params(a), _params(b)
    assert set(pa) == set(pb)
    for k, v in pa.items():
        assert v.dtype == pb[k].dtype and mx.array_equal(v, pb[k]), k


def test_shard_aware_load_equals_cutting_the_loaded_model(tmp_path):
    """load_model(path, shard=(rank, size)) gives exactly the arrays of loading whole and cutting:
    float (stored bf16, read as float32) over 3 uneven ranks, a 4-bit tied qwen2 with a replicated KV
    head, 4-bit mixtral experts, phi3's fused rows, and a JANG_4M bundle (index + numbered shards)."""
    from jang_serve.engine.loader import load_model
    from jang_serve.quantize import convert

    from engine_helpers import tiny_model

    m, cfg = tiny_model(3, num_attention_heads=4, num_key_value_heads=2)
    m.set_dtype(mx.bfloat16)
    bf16 = save_model(m, cfg, tmp_path / "bf16")
    m, cfg = tiny_model(3, hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
    jang = convert(save_model(m, cfg, tmp_path / "src"), tmp_path / "jang", profile="JANG_4M").path
    cases = [(bf16, 3), (jang, 2),
             (tiny_dir(tmp_path / "q", quant=(4, 32), model_type="qwen2", attention_bias=True,
                       tie_word_embeddings=True, num_attention_heads=4, num_key_value_heads=1), 2),
             (tiny_dir(tmp_path / "moe", quant=(4, 32), model_type="mixtral", num_local_experts=4,
                       num_experts_per_tok=2), 2),
             (tiny_dir(tmp_path / "phi", model_type="phi3", num_attention_heads=4, num_key_value_heads=2), 2)]
    for path, size in cases:
        for rank in range(size):
            whole = load_model(path, dtype="float32")
            info = shard_model(whole.model, None, rank, size)
            part = load_model(path, dtype="float32", shard=(rank, size))
            _same_params(whole.model, part.model)
            assert part.shard == info and part.format == whole.format, path
    assert part.model.model.layers[0].mlp.gate_up_proj.weight.shape == (128, 64)  # phi3 rank 1: 64 gate + 64 up rows


def _hf_experts(model, cfg: dict, out: Path, names: dict[str, str] | None, quant=None) -> Path:
    """A MoE folder in Hugging Face layout: one tensor per expert (`...experts.<e>.<name>.<suffix>`),
    or with names=None the transformers-5 fused `experts.gate_up_proj` [E, 2I, D] / `experts.down_proj`."""
    if quant:
        quantize_model(model, lambda p, m: quant)
        cfg = dict(cfg, quantization={"bits": quant[0], "group_size": quant[1]})
    mx.eval(model.parameters())
    params, w = _params(model), {}
    for k, v in params.items():
        if ".switch_mlp." not in k:
            w[k] = v
            continue
        pre, proj_suffix = k.split(".switch_mlp.")
        proj, suffix = proj_suffix.split(".")
        if names is not None:
            w.update({f"{pre}.experts.{e}.{names[proj]}.{suffix}": v[e] for e in range(v.shape[0])})
        elif proj == "down_proj":  # fused (float): down as is, gate rows then up rows of every expert
            g, u = params[f"{pre}.switch_mlp.gate_proj.weight"], params[f"{pre}.switch_mlp.up_proj.weight"]
            w[f"{pre}.experts.down_proj"] = v
            w[f"{pre}.experts.gate_up_proj"] = mx.concatenate([g, u], axis=1)
    out.mkdir(parents=True)
    mx.save_safetensors(str(out / "model.safetensors"), w)
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def test_shard_aware_load_of_per_expert_checkpoints(tmp_path):
    """Per-expert tensors (which sanitize stacks with mx.stack) are read by slice too: sanitize runs
    on index probes, each stack becomes a StackedTensor of file windows. A layout sanitize has to
    slice (transformers-5 fused gate_up) falls back to reading whole, then cutting. Same arrays as
    loading whole and cutting in every case."""
    from jang_serve.engine.distributed.shard_load import bytes_read
    from jang_serve.engine.loader import load_model

    from engine_helpers import tiny_model

    mix = dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2)
    q3 = dict(model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, head_dim=16)
    same = {n: n for n in ("gate_proj", "up_proj", "down_proj")}
    cases = [(_hf_experts(*tiny_model(2, **mix), tmp_path / "mixtral", {"gate_proj": "w1", "up_proj": "w3",
                                                                         "down_proj": "w2"}), 0.5),
             (_hf_experts(*tiny_model(2, **q3, mlp_only_layers=[0]), tmp_path / "q3-q4", same, (4, 32)), 0.47),
             (_hf_experts(*tiny_model(2, **q3), tmp_path / "q3-fused", None), 1.0)]
    for path, share in cases:
        total = (path / "model.safetensors").stat().st_size
        for rank in range(2):
            whole = load_model(path)
            info = shard_model(whole.model, None, rank, 2)
            before = bytes_read()
            part = load_model(path, shard=(rank, 2))
            _same_params(whole.model, part.model)
            assert part.shard == info
            assert abs((bytes_read() - before) / total - share) < 0.03, (path.name, (bytes_read() - before) / total)


def test_a_rank_reads_and_holds_about_1_over_n_of_the_model(tmp_path):
    """Bytes copied out of the safetensors file, and the peak MLX memory of the load, are ~1/N of
    the whole model's (a whole load peaks at the whole model), for float32 and 4-bit weights."""
    import gc

    from jang_serve.engine.distributed.shard_load import bytes_read
    from jang_serve.engine.loader import load_model

    kw = dict(hidden_size=256, intermediate_size=1024, vocab_size=4096, num_attention_heads=8, num_key_value_heads=4)
    for quant in (None, (4, 32)):
        d = tiny_dir(tmp_path / str(quant), quant=quant, **kw)
        total = (d / "model.safetensors").stat().st_size
        for shard in (None, (1, 2), (3, 4)):
            gc.collect()
            mx.clear_cache()
            mx.reset_peak_memory()
            base, before = mx.get_active_memory(), bytes_read()
            lm = load_model(d, shard=shard)
            peak, read = (mx.get_peak_memory() - base) / total, (bytes_read() - before) / total
            held = sum(v.nbytes for v in _params(lm.model).values()) / total
            n = shard[1] if shard else 1
            assert abs(held - 1 / n) < 0.03 and peak < 1 / n + 0.05, (quant, shard, held, peak)
            if shard:  # the whole load goes through mx.load, not the counting reader
                assert abs(read - 1 / n) < 0.03, (quant, shard, read)
            del lm


def test_synthetic_shards_equal_the_cut_whole_model(tmp_path):
    """The benchmark's random models: a rank's generated shard is the same slice of the whole model."""
    from jang_serve.engine.distributed.synthetic import load_synthetic, write_spec
    from engine_helpers import tiny_config

    cfg = tiny_config(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
    mods = {f"model.layers.{i}.{n}": (8 if "attn" in n else 4, 64) for i in range(cfg["num_hidden_layers"])
            for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                      "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    d = write_spec(tmp_path / "syn", cfg, dict(mods, **{"model.embed_tokens": (4, 64), "lm_head": (8, 64)}))
    whole = load_synthetic(d)
    g = whole.model.model.layers[0].mlp.gate_proj
    w = mx.dequantize(g.weight, g.scales, g.biases, g.group_size, g.bits)
    assert abs(w.mean().item()) < 2e-3 and 0.018 < w.std().item() < 0.022  # centred, std 0.02
    for rank in range(2):
        cut = load_synthetic(d)
        info = shard_model(cut.model, None, rank, 2)
        part = load_synthetic(d, shard=(rank, 2))
        _same_params(cut.model, part.model)
        assert part.shard == info


def test_tp_gpu_bench_smoke_on_cpu(tmp_path):
    """bench/tp_gpu.py end to end with tiny shapes on the ring backend: tp 1 and tp 2 in their own
    processes, the merged JSON with tokens/s, roofline, scaling, and tp 2 == tp 1 greedy tokens; and
    the all_sum latency entry (bench/tp_collectives.py)."""
    out = tmp_path / "tp.json"
    p = subprocess.run([sys.executable, str(HERE.parent / "bench" / "tp_gpu.py"), str(out), "--plan",
                        "tiny:1,tiny:2,collectives:2",
                        "--prompt", "16", "--gen1", "8", "--genb", "6", "--conc", "4", "--kv-gb", "0.02"],
                       capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    res = json.loads(out.read_text())
    one, two = res["configs"]["tiny:1"], res["configs"]["tiny:2"]
    for r in (one, two):
        assert r["exit"] == 0 and r["versions"]["mlx"] and r["date"] and r["device"]
        assert r["runs"]["batch1"]["decode_tok_s"] > 0 and r["runs"]["batched"]["tok_s"] > 0
        assert r["runs"]["batched"]["generated"] == 4 * 6 and r["model"]["roofline_tok_s_batch1"] > 0
    assert two["backend"] == "ring" and two["env"]["NCCL_NVLS_ENABLE"] == "0" and two["shard_rank0"]["size"] == 2
    assert 0.45 < two["model"]["weight_bytes_rank0"] / one["model"]["weight_bytes_rank0"] < 0.55
    sc = res["scaling"]["tiny:2"]
    assert sc["batch1_greedy_tokens_agreeing"] == "8/8" and sc["batched_greedy_tokens_agreeing"] == "6/6"
    assert sc["batched_tok_s_vs_tp1"] > 0
    coll = res["configs"]["collectives:2"]  # all_sum latency over the same launch path
    assert coll["exit"] == 0 and coll["backend"] == "ring" and coll["follower_exit"] == [0]
    assert all(v["chained_us"] > 0 and v["synced_us"] > 0 for v in coll["all_sum"].values())


# -- multi-process --------------------------------------------------------------------------------
def run_driver(*args: str, timeout: float = 150.0) -> dict:
    p = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, timeout=timeout,
                       env=dict(os.environ, PYTHONUNBUFFERED="1"))
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    assert p.returncode == 0 and lines, f"driver failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def _requests(vocab: int, max_tokens: int) -> list[dict]:
    from engine_helpers import random_prompts

    reqs = [dict(prompt=p, max_tokens=max_tokens) for p in random_prompts(4, 3, 40, vocab, seed=7)]
    reqs.append(dict(prompt=random_prompts(1, 21, 21, vocab, seed=8)[0], max_tokens=max_tokens, n=2))  # a fork
    return reqs


def test_tp2_tiny_float_equals_single_process(tmp_path):
    d = tiny_dir(tmp_path, num_attention_heads=4, num_key_value_heads=2)
    out = run_driver("equal", str(d), json.dumps(_requests(256, 10)))
    assert out["tp"] == out["ref"]
    assert all(len(c) == 10 for r in out["ref"] for c in r)
    assert out["stats"]["tp_size"] == 2 and out["stats"]["blocks_used"] == 0
    assert out["shard"] == {"rank": 0, "size": 2, "heads": [0, 2], "kv_heads": [0, 1], "intermediate": 64,
                            "vocab_rows": [0, 128]}


def test_tp3_uneven_splits_and_padded_vocabulary_equal_single_process(tmp_path):
    """3 ranks: 4 query / 2 KV heads split 1/1/2 (KV head 0 on two ranks), the MLP 32/32/64, and a
    vocabulary of 256 as 86/86/84 rows (the last shard padded with zero rows, trimmed after the gather).
    Every rank, rank 0 included, loads only its own shard."""
    d = tiny_dir(tmp_path, num_attention_heads=4, num_key_value_heads=2)
    out = run_driver("equal", str(d), json.dumps(_requests(256, 8)), "auto", "3", "1")
    assert out["tp"] == out["ref"]
    assert out["shard"] == {"rank": 0, "size": 3, "heads": [0, 1], "kv_heads": [0, 1], "intermediate": 32,
                            "vocab_rows": [0, 86]}
    assert out["stats"]["tp_size"] == 3


def test_tp_option_is_validated():
    from jang_serve.server.config import ConfigError, load_config

    assert load_config(["--tp", "2"]).tp == 2
    with pytest.raises(ConfigError, match="'tp' must be at least 1"):
        load_config(["--tp", "0"])


def test_tp2_tiny_quantized_tied_replicated_kv_equals_single_process(tmp_path):
    """4-bit g32 weights (qwen2 biases, tied quantized embedding / head), 1 KV head over 2 ranks;
    both ranks load only their own shard."""
    d = tiny_dir(tmp_path, quant=(4, 32), model_type="qwen2", attention_bias=True, tie_word_embeddings=True,
                 num_attention_heads=4, num_key_value_heads=1)
    out = run_driver("equal", str(d), json.dumps(_requests(256, 10)), "auto", "2", "1")
    assert out["tp"] == out["ref"]
    assert out["shard"]["kv_heads"] == [0, 1] and out["shard"]["heads"] == [0, 2]


def test_tp2_tiny_gemma3_equals_single_process(tmp_path):
    """Gemma 3 pieces through the same sharding: sliding/full layers, q/k norms, scaled tied embedding."""
    d = tiny_dir(tmp_path, model_type="gemma3_text", head_dim=16, num_attention_heads=4, num_key_value_heads=2,
                 sliding_window=8, sliding_window_pattern=2, query_pre_attn_scalar=16, final_logit_softcapping=30.0)
    out = run_driver("equal", str(d), json.dumps(_requests(256, 10)))
    assert out["tp"] == out["ref"]
    assert len({t for r in out["ref"] for c in r for t in c}) > 5  # not one repeated token


def test_tp2_phi3_fused_projections_equal_single_process(tmp_path):
    d = tiny_dir(tmp_path, model_type="phi3", num_attention_heads=4, num_key_value_heads=2)
    out = run_driver("equal", str(d), json.dumps(_requests(256, 8)))
    assert out["tp"] == out["ref"]


def test_tp2_moe_equal_single_process(tmp_path):
    """Mixtral with 4-bit experts (every expert's intermediate halved, one all_sum after the mixture),
    and Qwen3-MoE with a dense first layer and q/k norms, float."""
    d = tiny_dir(tmp_path, quant=(4, 32), model_type="mixtral", num_local_experts=4, num_experts_per_tok=2)
    out = run_driver("equal", str(d), json.dumps(_requests(256, 8)))
    assert out["tp"] == out["ref"] and out["shard"]["intermediate"] == 64
    assert len({t for r in out["ref"] for c in r for t in c}) > 5
    d = tiny_dir(tmp_path / "q3", model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2,
                 moe_intermediate_size=64, mlp_only_layers=[0], head_dim=16)
    out = run_driver("equal", str(d), json.dumps(_requests(256, 8)))
    assert out["tp"] == out["ref"] and out["shard"]["intermediate"] == 64  # layer 0: dense 128 / 2


@pytest.fixture(scope="module")
def smollm2_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """SmolLM2-135M from its GGUF (tests/realdata.py) as mlx folders: float32, and quantized to 4 bits
    with group 32 (embedding / tied head too). Folders load in a fraction of the GGUF's time."""
    from realdata import smollm2_gguf

    from jang_serve.engine.loader import load_model

    lm = load_model(smollm2_gguf())
    root = tmp_path_factory.mktemp("smollm2")
    f32 = save_model(lm.model, lm.config, root / "f32", None, lm.tokenizer)
    return f32, save_model(lm.model, lm.config, root / "q4", (4, 32), lm.tokenizer)


def _text_requests(model_dir: Path, max_tokens: int) -> list[dict]:
    from jang_serve.engine.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(model_dir)
    texts = ["The capital of France is", "def fibonacci(n):\n    "]
    return [dict(prompt=tok.encode(t), max_tokens=max_tokens) for t in texts]


def test_tp2_smollm2_float_and_q4_equal_single_process(smollm2_dirs):
    reqs = _text_requests(smollm2_dirs[1], 5)
    for path in smollm2_dirs:
        out = run_driver("equal", str(path), json.dumps(reqs))
        assert out["tp"] == out["ref"], path
        assert out["shard"]["heads"] == [0, 3] and out["shard"]["kv_heads"] == [0, 1]  # 9 q / 3 kv heads


def test_smollm2_gguf_shard_is_read_whole_then_cut(smollm2_dirs):
    """A .gguf file under shard=(rank, size) is read whole, then cut: the same arrays as rank 1's
    shard-aware load of the float folder saved from that GGUF."""
    from realdata import smollm2_gguf

    from jang_serve.engine.loader import load_model

    g = load_model(smollm2_gguf(), shard=(1, 2))
    f = load_model(smollm2_dirs[0], shard=(1, 2))
    assert g.shard == f.shard and g.shard["heads"] == [3, 9] and g.shard["vocab_rows"] == [24576, 49152]
    _same_params(g.model, f.model)


def test_tp2_q4_kv_equals_single_process(tmp_path):
    """Each rank's q4 KV pool (smoothed + Hadamard-rotated per KV head) matches the single pool."""
    d = tiny_dir(tmp_path, hidden_size=128, num_attention_heads=4, num_key_value_heads=2)
    out = run_driver("equal", str(d), json.dumps(_requests(256, 10)), "q4")
    assert out["tp"] == out["ref"]
    assert out["stats"]["kv_dtype"] == "q4"


def test_tp2_q4_kv_with_key_centering_calibration_equals_single_process(tmp_path):
    """With a tokenizer, a q4 KV pool runs a calibration pass at creation (engine/kv_calibration.py,
    per-channel key/value means): every rank runs it at the same point (collectives line up, no
    hang), each for its own KV heads, and the greedy tokens still equal the single process."""
    import shutil

    from serve_helpers import tiny_model_dir

    src = tiny_model_dir()
    vocab = json.loads((src / "config.json").read_text())["vocab_size"]
    d = tiny_dir(tmp_path, hidden_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab)
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy(f, d / f.name)
    out = run_driver("equal", str(d), json.dumps(_requests(vocab, 8)), "q4", "2", "1")
    assert out["kv_centered"] and out["stats"]["kv_dtype"] == "q4"
    assert out["tp"] == out["ref"]


def test_a_stuck_rank_trips_the_step_timeout(tmp_path):
    """A rank that is alive but stopped (SIGSTOP) cannot hang the service: the step watchdog fails it."""
    d = tiny_dir(tmp_path, num_attention_heads=4, num_key_value_heads=2)
    out = run_driver("kill", str(d), "SIGSTOP")
    assert out["stream_error"][0] == "EngineDeadError"
    assert "has not finished within 2 s" in out["stream_error"][1]
    assert 1.5 < out["seconds_to_error"] < 10
    assert out["new_request_error"][0] == "EngineDeadError"


def test_killing_a_rank_mid_stream_gives_a_clear_error(tmp_path):
    d = tiny_dir(tmp_path, num_attention_heads=4, num_key_value_heads=2)
    out = run_driver("kill", str(d), "SIGKILL")
    assert out["stream_error"][0] == "EngineDeadError"
    assert "rank 1" in out["stream_error"][1] and "signal 9" in out["stream_error"][1]
    assert out["seconds_to_error"] < 10
    assert out["new_request_error"][0] == "EngineDeadError"
    assert out["on_fatal"] and "rank 1" in out["on_fatal"]
    assert out["stats"]["tp_error"] and out["stats"]["engine_running"] is False


def test_a_rank_that_cannot_load_is_a_clear_error(tmp_path):
    from jang_serve.engine.distributed.launch import Followers, RankFailure
    from jang_serve.engine.engine_config import EngineConfig

    with pytest.raises(RankFailure, match="rank 1 exited with status 1 while loading the model"):
        Followers(tmp_path / "missing-model", mx.float32, EngineConfig(num_blocks=8), 2, "ring", ready_timeout=60)


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def test_jang_serve_tp2_http(tmp_path):
    """`jang-serve --tp 2`: the openai client gets the single-process greedy text; killing rank 1
    turns /health into a 503 naming the rank, and requests fail with that message (no hang)."""
    import httpx
    import openai
    from serve_helpers import start_jang_serve, tiny_model_dir

    from jang_serve.engine.engine_config import EngineConfig
    from jang_serve.engine.engine_core import EngineCore
    from jang_serve.engine.loader import load_model
    from jang_serve.engine.sampling_params import SamplingParams

    model = tiny_model_dir()
    lm = load_model(model)
    prompt = "Functions and classes"
    ids = lm.tokenizer.encode(prompt, add_special_tokens=True)
    ref = EngineCore(lm, EngineConfig(num_blocks=BLOCKS)).generate([ids], SamplingParams(max_tokens=8, temperature=0))
    srv = start_jang_serve(model, "--tp", "2", timeout=120)
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60)
        r = client.completions.create(model=model.name, prompt=prompt, max_tokens=8, temperature=0)
        assert r.choices[0].text == lm.tokenizer.decode(ref[0])
        chat = client.chat.completions.create(model=model.name, messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=4, temperature=0, stream=True)
        assert sum(1 for _ in chat) >= 2
        followers = [c for c in _children(srv.pid) if "worker" in Path(f"/proc/{c}/cmdline").read_text()]
        assert len(followers) == 1
        os.kill(followers[0], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            h = httpx.get(srv.url + "/health", timeout=5)
            if h.status_code == 503:
                break
            time.sleep(0.2)
        assert h.status_code == 503, h.text
        err = h.json()["models"][model.name]["error"]
        assert "rank 1" in err and "killed by signal 9" in err
        with pytest.raises(openai.APIStatusError) as e:
            client.completions.create(model=model.name, prompt=prompt, max_tokens=8, temperature=0)
        assert e.value.status_code == 503 and "rank 1" in str(e.value)
    finally:
        srv.stop()
    assert srv.proc.returncode is not None


# -- the driver (runs as its own process) ---------------------------------------------------------
async def _collect(engine, reqs: list[dict]) -> list[list[list[int]]]:
    from jang_serve.engine.sampling_params import SamplingParams

    async def one(r):
        n = r.get("n", 1)
        toks = [[] for _ in range(n)]
        async for d in engine.generate(r["prompt"], SamplingParams(max_tokens=r["max_tokens"], temperature=0, n=n,
                                                                   ignore_eos=True)):
            toks[d.index] += d.token_ids
        return toks

    return list(await asyncio.gather(*[one(r) for r in reqs]))


def _driver_equal(path: str, reqs: list[dict], kv_dtype: str = "auto", size: str = "2", shard0: str = "0") -> dict:
    from jang_serve.engine.async_engine import AsyncEngine
    from jang_serve.engine.distributed import start_tp_engine
    from jang_serve.engine.engine_config import EngineConfig
    from jang_serve.engine.loader import load_model

    cfg = EngineConfig(num_blocks=BLOCKS, block_size=16, kv_dtype=kv_dtype)
    t0 = time.perf_counter()
    single = AsyncEngine(load_model(path), cfg)
    t1 = time.perf_counter()
    ref = asyncio.run(_collect(single, reqs))
    t2 = time.perf_counter()
    single.shutdown()
    # shard0 "1": rank 0 too loads only its own shard (as `jang-serve --tp` does); else whole, then cut
    tp = start_tp_engine(load_model(path, shard=(0, int(size)) if shard0 == "1" else None), cfg, int(size))
    t3 = time.perf_counter()
    got = asyncio.run(_collect(tp, reqs))
    t4 = time.perf_counter()
    time.sleep(0.1)
    stats = tp.stats()
    means = getattr(getattr(tp.core.pool, "transform", None), "k_mean", None) or []
    tp.shutdown()
    return {"ref": ref, "tp": got, "stats": stats, "shard": tp.shard_info,
            "kv_centered": any(m is not None for m in means),
            "seconds": {"load": t1 - t0, "single": t2 - t1, "tp_start": t3 - t2, "tp": t4 - t3}}


def _driver_kill(path: str, sig: str) -> dict:
    from jang_serve.engine.distributed import start_tp_engine
    from jang_serve.engine.engine_config import EngineConfig
    from jang_serve.engine.loader import load_model
    from jang_serve.engine.sampling_params import SamplingParams

    tp = start_tp_engine(load_model(path), EngineConfig(num_blocks=BLOCKS), 2, step_timeout=2.0)
    fatal = []
    tp.on_fatal = fatal.append
    out: dict = {}

    async def stream():
        n, t_kill = 0, None
        try:
            async for _ in tp.generate(list(range(1, 30)), SamplingParams(max_tokens=1000, temperature=0,
                                                                           ignore_eos=True)):
                n += 1
                if n == 3:
                    os.kill(tp.followers.procs[0].pid, getattr(signal, sig))
                    t_kill = time.monotonic()
        except Exception as e:
            out["stream_error"] = [type(e).__name__, str(e)]
            out["seconds_to_error"] = time.monotonic() - t_kill if t_kill else -1.0  # -1: failed before the kill
        try:
            async for _ in tp.generate([1, 2, 3], SamplingParams(max_tokens=2)):
                pass
        except Exception as e:
            out["new_request_error"] = [type(e).__name__, str(e)]

    asyncio.run(asyncio.wait_for(stream(), 60))
    time.sleep(0.6)
    out["on_fatal"] = fatal[0] if fatal else None
    out["stats"] = tp.stats()
    tp.shutdown(timeout=5)
    return out


if __name__ == "__main__":
    mode, model_path = sys.argv[1], sys.argv[2]
    if mode == "equal":
        result = _driver_equal(model_path, json.loads(sys.argv[3]), *sys.argv[4:])
    else:
        result = _driver_kill(model_path, sys.argv[3])
    print("RESULT " + json.dumps(result), flush=True)
    os._exit(0)
