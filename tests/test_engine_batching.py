"""Continuous batching over the paged KV cache gives exactly the tokens of each request run alone."""

import asyncio

import pytest

from engine_helpers import random_prompts, reference_greedy, tiny_model
from jang_serve.engine.async_engine import AsyncEngine
from jang_serve.engine.engine_config import EngineConfig
from jang_serve.engine.engine_core import EngineCore
from jang_serve.engine.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny():
    return tiny_model()


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(16, 1, 90, 256)


@pytest.fixture(scope="module")
def reference(tiny, prompts):
    model, _ = tiny
    return [reference_greedy(model, p, GREEDY.max_tokens) for p in prompts]


@pytest.mark.parametrize("padded", ["0", "1"])
def test_16_batched_equal_alone(tiny, prompts, reference, padded, monkeypatch):
    """Also with the step's prefills padded into one attention call (the GPU default)."""
    monkeypatch.setenv("JANG_PADDED_PREFILL", padded)
    model, cfg = tiny
    core = EngineCore((model, None, cfg), EngineConfig(num_blocks=256, max_num_batched_tokens=96,
                                                       enable_prefix_caching=False))
    outs = core.generate(prompts, GREEDY)
    assert outs == reference
    # chunked prefill happened (budget 96 < total prompt tokens) and decodes were batched
    assert core.num_steps < 16 * GREEDY.max_tokens
    assert core.blocks.num_used == 0


def test_each_alone_through_engine(tiny, prompts, reference):
    model, cfg = tiny
    core = EngineCore((model, None, cfg), EngineConfig(num_blocks=64, max_num_batched_tokens=32))
    for p, ref in zip(prompts[:4], reference[:4]):
        assert core.generate([p], GREEDY)[0] == ref


def test_prefix_cache_shared_500_tokens(tiny):
    model, cfg = tiny
    shared = random_prompts(1, 500, 500, 256, seed=7)[0]
    tails = random_prompts(16, 1, 40, 256, seed=8)
    prompts = [shared + t for t in tails]
    ref = [reference_greedy(model, p, 6) for p in prompts]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    core = EngineCore((model, None, cfg), EngineConfig(num_blocks=400, max_num_batched_tokens=256))
    first = core.generate(prompts[:1], params)
    assert first == ref[:1]
    ids = [f"p{i}" for i in range(16)]
    for rid, p in zip(ids, prompts):
        core.add_request(rid, p, params)
    outs, cached = {r: [] for r in ids}, {}
    while core.has_work():
        for d in core.step():
            outs[d.request_id].extend(d.token_ids)
            cached[d.request_id] = d.cached_tokens
    assert [outs[r] for r in ids] == ref
    # p0 ran before: all its full blocks are cached; the others share 31 full blocks (496 tokens)
    assert cached["p0"] == (len(prompts[0]) - 1) // 16 * 16
    assert [cached[r] for r in ids[1:]] == [496] * 15, cached
    assert core.stats()["prefix_hit_rate"] > 0.5
    assert core.blocks.num_used == 0 and core.blocks.num_cached > 31


def test_preempted_request_matches_unpreempted(tiny):
    model, cfg = tiny
    prompts = random_prompts(6, 20, 40, 256, seed=3)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    ref = [reference_greedy(model, p, 40) for p in prompts]
    # 20 blocks of 16 = 320 slots; 6 sequences need up to 80 tokens each -> preemption
    core = EngineCore((model, None, cfg), EngineConfig(num_blocks=20, max_num_batched_tokens=128,
                                                       enable_prefix_caching=False))
    outs = core.generate(prompts, params)
    assert core.scheduler.num_preemptions > 0
    assert outs == ref
    assert core.blocks.num_used == 0


def test_preemption_with_prefix_cache(tiny):
    model, cfg = tiny
    prompts = random_prompts(6, 20, 40, 256, seed=4)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    ref = [reference_greedy(model, p, 40) for p in prompts]
    core = EngineCore((model, None, cfg), EngineConfig(num_blocks=20, max_num_batched_tokens=64))
    assert core.generate(prompts, params) == ref
    assert core.scheduler.num_preemptions > 0


def test_abort_half_of_32_streams_returns_every_block(tiny):
    model, cfg = tiny
    prompts = random_prompts(32, 5, 60, 256, seed=5)
    engine = AsyncEngine((model, None, cfg), EngineConfig(num_blocks=512, max_num_batched_tokens=512))

    async def run():
        got = {}

        async def stream(i):
            n = 0
            async for d in engine.generate(prompts[i], SamplingParams(max_tokens=30, temperature=0,
                                                                      ignore_eos=True), f"s{i}"):
                n += len(d.token_ids)
                got[i] = d
                if i % 2 == 0 and n >= 3:
                    engine.abort(f"s{i}")
            return i

        await asyncio.gather(*(stream(i) for i in range(32)))
        return got

    try:
        got = asyncio.run(run())
        for i, d in got.items():
            if i % 2:
                assert d.finish_reason == "length" and d.completion_tokens == 30
            else:
                assert d.finish_reason == "abort" and d.completion_tokens < 30
        core = engine.core
        assert core.blocks.num_used == 0
        assert all(r == 0 for r in core.blocks.ref)
        assert core.blocks.num_free == core.blocks.num_blocks
        assert not core.requests and not core.scheduler.running and not core.scheduler.waiting
    finally:
        engine.shutdown()


def test_abort_frees_blocks_in_the_same_step(tiny):
    model, cfg = tiny
    core = EngineCore((model, None, cfg), EngineConfig(num_blocks=64, enable_prefix_caching=False))
    core.add_request("a", list(range(50)), SamplingParams(max_tokens=50, temperature=0))
    core.add_request("b", list(range(30)), SamplingParams(max_tokens=50, temperature=0))
    core.step()
    used = core.blocks.num_used
    assert used == 4 + 2
    deltas = core.abort("a")
    assert [d.finish_reason for d in deltas] == ["abort"]
    assert core.blocks.num_used == 2
    core.abort("b")
    assert core.blocks.num_used == 0 and not core.has_work()


def test_bad_requests_fail_clearly(tiny):
    model, cfg = tiny
    core = EngineCore((model, None, cfg), EngineConfig(num_blocks=8))
    with pytest.raises(ValueError, match="empty"):
        core.add_request("x", [], GREEDY)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        core.add_request("x", [1, 999], GREEDY)
    with pytest.raises(ValueError, match="max_model_len"):
        core.add_request("x", [1] * 200, GREEDY)  # 8 blocks x 16 = 128 slots
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        core.add_request("x", [1], SamplingParams(stop=["\n"]))
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)


def test_async_engine_n_choices_errors_and_stats(tiny):
    model, cfg = tiny
    engine = AsyncEngine((model, None, cfg), EngineConfig(num_blocks=64))

    async def run():
        deltas = [d async for d in engine.generate([5, 6, 7] * 7, SamplingParams(max_tokens=5, n=3, seed=9,
                                                                                 ignore_eos=True), "n3")]
        with pytest.raises(ValueError, match="empty"):
            async for _ in engine.generate([], SamplingParams(), "bad"):
                pass
        # a stream closed early aborts its request
        agen = engine.generate([1, 2, 3], SamplingParams(max_tokens=500, ignore_eos=True), "early")
        await agen.__anext__()
        await agen.aclose()
        await asyncio.sleep(0.2)
        return deltas

    try:
        deltas = asyncio.run(run())
        finals = {d.index: d for d in deltas if d.finish_reason}
        assert sorted(finals) == [0, 1, 2]
        assert all(f.finish_reason == "length" and f.completion_tokens == 5 and f.prompt_tokens == 21
                   for f in finals.values())
        assert sum(len(d.token_ids) for d in deltas) == 15
        s = engine.stats()
        for key in ("running", "waiting", "blocks_used", "blocks_free", "blocks_cached", "prefix_hit_rate",
                    "preemptions"):
            assert key in s
        assert s["blocks_used"] == 0 and s["running"] == 0 and engine.core.blocks.num_used == 0
        assert engine.max_model_len == 64 * 16 and engine.tokenizer is None
    finally:
        engine.shutdown()


def test_long_prefill_does_not_starve_decodes(tiny):
    model, cfg = tiny
    core = EngineCore((model, None, cfg), EngineConfig(num_blocks=64, max_num_batched_tokens=16))
    core.add_request("short", [1, 2, 3, 4, 5], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    core.step()
    core.add_request("long", list(range(200)), SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    for _ in range(12):  # the long prompt is prefilled in 15-token chunks meanwhile
        assert [d.request_id for d in core.step()] == ["short"]
    assert 0 < core.requests["long"][0].num_computed < 200


def test_running_stream_gets_a_token_every_step_during_a_long_prefill(tiny):
    """Decodes first, prefill capped at max_prefill_chunk per step while streams run; a prompt
    with nobody decoding takes the whole budget. Outputs stay equal to each request alone."""
    model, cfg = tiny
    short, long_ = [1, 2, 3, 4, 5], random_prompts(1, 300, 300, 256, seed=3)[0]
    sp = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    core = EngineCore((model, None, cfg), EngineConfig(num_blocks=64, max_num_batched_tokens=2048,
                                                       max_prefill_chunk=32))
    core.add_request("short", short, sp)
    first = core.step()
    assert [d.request_id for d in first] == ["short"]  # alone: its whole prefill, then a token
    core.add_request("long", long_, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    out, prefill_steps = {"short": list(first[0].token_ids), "long": []}, 0
    while core.requests["long"][0].num_computed < len(long_):
        before = core.requests["long"][0].num_computed
        deltas = core.step()
        step_ids = [d.request_id for d in deltas]
        assert step_ids.count("short") == 1, step_ids  # the running stream got its token this step
        assert core.requests["long"][0].num_computed - before == min(32, len(long_) - before)
        for d in deltas:
            out[d.request_id] += d.token_ids
        prefill_steps += 1
    assert prefill_steps == -(-len(long_) // 32)  # 10 chunks of <= 32 tokens
    while core.has_work():
        for d in core.step():
            out[d.request_id] += d.token_ids
    assert out["short"] == reference_greedy(model, short, 16)
    assert out["long"] == reference_greedy(model, long_, 4)
    # nobody decoding: a long prompt is prefilled in one step, with the whole budget
    core.add_request("alone", long_, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    assert [d.token_ids for d in core.step()] == [reference_greedy(model, long_, 1)]
