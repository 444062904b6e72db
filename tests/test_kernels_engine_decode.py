"""The GPU decode path of the engine, run on the CPU: pipelined decode (engine/async_decode.py)
must give exactly the deltas of the synchronous engine, and the fused q/k/v and gate/up
projections (engine/models/layers.fuse_projections) the same tokens as the unfused model."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest
from engine_helpers import random_prompts, tiny_model

from jang_serve.engine.async_decode import PLACEHOLDER
from jang_serve.engine.engine_config import EngineConfig
from jang_serve.engine.engine_core import EngineCore
from jang_serve.engine.sampling_params import SamplingParams


def _byte_tokenizer():
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers

    from jang_serve.engine.tokenizer import Tokenizer, _bytes_to_unicode

    b2u = _bytes_to_unicode()
    tok = HFTok(models.BPE(vocab={c: b for b, c in b2u.items()}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return Tokenizer(tok)


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(seed=3)


def _run(model, cfg, jobs, async_decode, tokenizer=None, num_blocks=256, abort_at=None):
    """Drive an EngineCore step by step; returns every delta as a comparable tuple, the step count
    and the final stats."""
    core = EngineCore((model, tokenizer, dict(cfg, eos_token_id=7)),
                      EngineConfig(num_blocks=num_blocks, block_size=4, max_num_seqs=16, async_decode=async_decode))
    for rid, prompt, params in jobs:
        core.add_request(rid, prompt, params)
    out, steps = [], 0
    while core.has_work():
        ds = core.step()
        steps += 1
        if abort_at and steps == abort_at[1]:
            ds += core.abort(abort_at[0])
        for d in ds:
            out.append((d.request_id, d.index, tuple(d.token_ids), d.text, d.finish_reason, d.completion_tokens))
        for seqs in core.requests.values():  # placeholders only ever at the end, one at most
            for s in seqs:
                assert PLACEHOLDER not in s.token_ids[:-1]
    assert not core.pipeline.pending or not core.has_work()
    return sorted(out, key=lambda t: (t[0], t[1])), steps, core.stats()


def _tokens_by_request(deltas):
    got = {}
    for rid, _i, toks, *_ in deltas:
        got.setdefault(rid, []).extend(toks)
    return got


def test_pipelined_equals_synchronous_greedy_and_seeded(tiny):
    model, cfg = tiny
    prompts = random_prompts(6, 3, 30, cfg["vocab_size"], seed=5)
    jobs = []
    for i, p in enumerate(prompts):
        if i % 3 == 0:
            sp = SamplingParams(max_tokens=5 + 3 * i, temperature=0, ignore_eos=True)
        elif i % 3 == 1:
            sp = SamplingParams(max_tokens=12, temperature=0.9, top_k=20, top_p=0.9, seed=100 + i, ignore_eos=True)
        else:
            sp = SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[p[0]])  # eos 7 can stop it too
        jobs.append((f"r{i}", p, sp))
    sync, _, st_sync = _run(model, cfg, jobs, False)
    pipe, _, st_pipe = _run(model, cfg, jobs, True)
    assert _tokens_by_request(pipe) == _tokens_by_request(sync)
    assert [d[4] for d in pipe] and [(d[0], d[4], d[5]) for d in pipe if d[4]] == \
        [(d[0], d[4], d[5]) for d in sync if d[4]]
    assert st_pipe["blocks_used"] == 0 and st_pipe["running"] == 0 and st_pipe["generated_tokens"] == \
        st_sync["generated_tokens"]


def test_pipelined_stop_strings_and_text(tiny):
    model, cfg = tiny
    tok = _byte_tokenizer()
    prompts = random_prompts(4, 5, 12, cfg["vocab_size"], seed=9)
    # Stop on a two-byte string the synchronous run actually produces, so the lagging check must fire.
    probe, _, _ = _run(model, cfg, [("p", prompts[0], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))],
                       False, tok)
    text = "".join(d[3] for d in probe)
    stop = text[6:8] if len(text) >= 8 else text[-2:]
    jobs = [(f"s{i}", p, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=[stop]))
            for i, p in enumerate(prompts)]
    sync, _, _ = _run(model, cfg, jobs, False, tok)
    pipe, _, _ = _run(model, cfg, jobs, True, tok)
    assert sync == pipe
    assert any(d[4] == "stop" for d in sync if d[0] == "s0")


def test_pipelined_abort_and_preemption(tiny):
    model, cfg = tiny
    prompts = random_prompts(8, 8, 20, cfg["vocab_size"], seed=11)
    jobs = [(f"a{i}", p, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)) for i, p in enumerate(prompts)]
    # A small pool forces preemptions mid-decode; tokens must still equal the roomy synchronous run.
    roomy, _, _ = _run(model, cfg, jobs, False)
    tight, _, st = _run(model, cfg, jobs, True, num_blocks=40)
    assert st["preemptions"] > 0
    assert _tokens_by_request(tight) == _tokens_by_request(roomy)
    # Abort one request in the middle of pipelined decoding: no placeholder leaks into its count.
    ab, _, st2 = _run(model, cfg, jobs, True, abort_at=("a3", 12))
    fin = [d for d in ab if d[0] == "a3" and d[4]]
    assert fin and fin[-1][4] == "abort" and fin[-1][5] == len(_tokens_by_request(ab)["a3"])
    assert st2["blocks_used"] == 0


def test_pipelined_steps_overlap(tiny):
    """The pipelined engine queues a step before reading the previous one: it needs exactly one
    step more than the synchronous engine per drained batch, never a read-back per step."""
    model, cfg = tiny
    jobs = [("o", random_prompts(1, 10, 10, cfg["vocab_size"], seed=2)[0],
             SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))]
    _, n_sync, _ = _run(model, cfg, jobs, False)
    _, n_pipe, _ = _run(model, cfg, jobs, True)
    assert n_pipe == n_sync + 1


def _logits(model, tokens):
    from jang_serve.engine.attention import ContiguousBackend, ContiguousKV

    be = ContiguousBackend([ContiguousKV(model.num_layers)], [len(tokens)])
    return model(mx.array(tokens, dtype=mx.int32), mx.arange(len(tokens)), be)


@pytest.mark.parametrize("family,quant", [("llama", None), ("llama", "q4"), ("llama", "mixed"), ("qwen2", "q4")])
def test_fused_projections_same_logits(family, quant):
    from jang_serve.engine.models.layers import FusedLinear, QLinear, fuse_projections, quantize_model

    model, cfg = tiny_model(seed=4, model_type=family, attention_bias=family == "qwen2")
    if quant == "q4":
        quantize_model(model, lambda path, m: (4, 32) if isinstance(m, nn.Linear) else None)
    elif quant == "mixed":  # k_proj at 8 bits: q/k/v cannot share one qmm; gate/up still fuse
        quantize_model(model, lambda path, m: ((8, 32) if "k_proj" in path else (4, 32))
                       if isinstance(m, nn.Linear) else None)
    mx.eval(model.parameters())
    toks = random_prompts(1, 9, 9, cfg["vocab_size"], seed=3)[0]
    before = _logits(model, toks)
    n = fuse_projections(model)
    layers = cfg["num_hidden_layers"]
    assert n == (layers if quant == "mixed" else 2 * layers)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert ("qkv_fused" in attn) == (quant != "mixed") and ("q_proj" in attn) == (quant == "mixed")
    assert isinstance(mlp.gate_up_fused, FusedLinear) and "gate_proj" not in mlp
    assert mlp.gate_up_fused.quantized == (quant is not None)
    if quant:
        assert isinstance(mlp.down_proj, QLinear)
    after = _logits(model, toks)
    assert mx.allclose(before, after, atol=1e-4, rtol=1e-4).item()
    assert fuse_projections(model) == 0  # idempotent


def test_engine_fuses_on_request_and_matches():
    model, cfg = tiny_model(seed=6)
    prompts = random_prompts(3, 4, 12, cfg["vocab_size"], seed=8)
    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    plain = EngineCore((model, None, cfg), EngineConfig(num_blocks=64, block_size=4, fuse_projections=False))
    want = plain.generate(prompts, sp)
    fused = EngineCore((model, None, cfg), EngineConfig(num_blocks=64, block_size=4, fuse_projections=True,
                                                         async_decode=True))
    assert "qkv_fused" in model.model.layers[0].self_attn
    assert fused.generate(prompts, sp) == want


@pytest.mark.parametrize("quant,kv", [(None, "auto"), ("q4", "auto"), ("q4", "q8")])
def test_compiled_blocks_same_tokens(quant, kv):
    from jang_serve.engine.models.compiled import compile_blocks
    from jang_serve.engine.models.layers import quantize_model

    model, cfg = tiny_model(seed=12, **({} if kv == "auto" else dict(hidden_size=128)))  # q8 KV: head_dim 32
    if quant:
        quantize_model(model, lambda path, m: (4, 32) if isinstance(m, nn.Linear) else None)
        mx.eval(model.parameters())
    prompts = random_prompts(5, 3, 14, cfg["vocab_size"], seed=13)
    sp = [SamplingParams(max_tokens=10, temperature=0, ignore_eos=True),
          SamplingParams(max_tokens=7, temperature=0.8, seed=5, ignore_eos=True)] * 2 + \
        [SamplingParams(max_tokens=9, temperature=0, ignore_eos=True)]
    # cpu_dense_gb=0: the quantized layers stay packed (the CPU would otherwise run dense copies of them)
    kvc = dict(kv_dtype=kv, kv_transform=False, cpu_dense_gb=0) | ({} if kv == "auto" else dict(kv_group_size=32))
    plain = EngineCore((model, None, cfg), EngineConfig(num_blocks=64, block_size=4, compile_decode=False, **kvc))
    want = plain.generate(prompts, sp)
    fast = EngineCore((model, None, cfg), EngineConfig(num_blocks=64, block_size=4, max_num_seqs=8,
                                                       compile_decode=True, fuse_projections=True,
                                                       async_decode=True, **kvc))
    blocks = model.model.layers
    assert all(b.compiled is not None for b in blocks) and compile_blocks(model) == 0
    assert fast.generate(prompts, sp) == want
    # quantized blocks take the fused norm/SwiGLU/residual matmuls (kernels.qmm_fused) inside the halves
    assert blocks[0].compiled.fused == dict(norm_qkv=bool(quant), swiglu=bool(quant), rope=bool(quant))
    assert (5, cfg["hidden_size"]) in {k[0] for k in blocks[0].compiled.seen}
    assert blocks[0].compiled.calls >= 5  # decode batches went through the compiled halves
    # ... chained: each block's post and the next block's pre are one compiled call
    assert all(b.compiled.link is not None for b in blocks[:-1]) and blocks[-1].compiled.link is None
    assert blocks[-1].compiled.calls == blocks[0].compiled.calls
    # ... and from the second step at a (batch, table width), the KV write and paged attention run
    # inside the compiled calls too (models/compiled.py _folded_chain)
    assert blocks[0].compiled.folded_calls >= 3
    del model.model.layers[0].compiled  # instance attribute: back to the class default (eager)
    assert model.model.layers[0].compiled is None


def test_fused_single_token_rope_path_same_qkv():
    """At one token the fused q/k/v rotate q and k in one RoPE call: same q, k, v as unfused."""
    from jang_serve.engine.models.layers import fuse_projections

    model, cfg = tiny_model(seed=21)
    attn = model.model.layers[1].self_attn
    x = mx.random.normal((1, cfg["hidden_size"]))
    pos = mx.array([37], dtype=mx.int32)
    before = attn.qkv(x, pos)
    fuse_projections(model)
    after = attn.qkv(x, pos)
    for a, b in zip(before, after):
        assert a.shape == b.shape and mx.allclose(a, b, atol=1e-5).item()


def test_gpu_defaults_run_in_the_async_engine_thread():
    """The server runs steps in AsyncEngine's own thread, not the one that built the engine: with the
    GPU's defaults (fused projections, compiled blocks, pipelined decode) forced on, every array the
    steps touch must exist there (lazily fused weights once failed with "There is no Stream(..., 0)
    in current thread"). Same tokens as the plain synchronous engine."""
    import asyncio

    from jang_serve.engine.async_engine import AsyncEngine

    async def generate(engine, prompts):
        async def one(i, p):
            ids = []
            async for d in engine.generate(p, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True), f"r{i}"):
                ids += d.token_ids
            return ids
        return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))

    prompts = [[1, 2, 3, 4], [5, 6, 7, 8, 9, 10], [11, 12]]
    outs = []
    for gpu_like in (False, True):
        model, cfg = tiny_model(seed=5)  # a fresh model each time: fusing changes it
        engine = AsyncEngine((model, None, cfg), EngineConfig(
            num_blocks=64, fuse_projections=gpu_like, compile_decode=gpu_like, async_decode=gpu_like))
        engine.start()
        try:
            outs.append(asyncio.run(generate(engine, prompts)))
        finally:
            engine.shutdown()
    assert outs[1] == outs[0] and all(len(o) == 6 for o in outs[0])
