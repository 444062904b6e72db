"""Sampling: seeds independent of the batch, n > 1 sharing prompt blocks, filters, penalties,
logit_bias, logprobs, stop token ids, stop strings."""

import math

import mlx.core as mx
import numpy as np
import pytest

from engine_helpers import random_prompts, reference_greedy, tiny_model
from jang_serve.engine.attention import ContiguousBackend, ContiguousKV
from jang_serve.engine.engine_config import EngineConfig
from jang_serve.engine.engine_core import EngineCore
from jang_serve.engine.sampler import apply_penalties, filter_logits
from jang_serve.engine.sampling_params import SamplingParams
from jang_serve.engine.sequence import Sequence


@pytest.fixture(scope="module")
def tiny():
    model, cfg = tiny_model(seed=2)
    # flatter logits than the greedy tests use, so sampling has real choices
    model.update({"lm_head": {"weight": model.lm_head.weight / 4}})
    mx.eval(model.parameters())
    return model, cfg


def _core(tiny, **kw):
    model, cfg = tiny
    return EngineCore((model, None, cfg), EngineConfig(num_blocks=256, **kw))


def _run(core, reqs):
    """reqs: {request_id: (prompt, params)} -> {(request_id, index): [tokens]}, {...: last delta}"""
    for rid, (p, sp) in reqs.items():
        core.add_request(rid, p, sp)
    toks, last = {}, {}
    while core.has_work():
        for d in core.step():
            toks.setdefault((d.request_id, d.index), []).extend(d.token_ids)
            last[(d.request_id, d.index)] = d
    return toks, last


def test_seeded_sample_is_the_same_whatever_the_batch(tiny):
    prompts = random_prompts(6, 3, 50, 256, seed=11)
    sp = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    alone, _ = _run(_core(tiny), {"x": (prompts[0], sp)})
    others = {f"o{i}": (p, SamplingParams(max_tokens=15, temperature=0.8, seed=i, ignore_eos=True))
              for i, p in enumerate(prompts[1:])}
    together, _ = _run(_core(tiny, max_num_batched_tokens=40), {**others, "x": (prompts[0], sp)})
    assert together[("x", 0)] == alone[("x", 0)]
    other_seed, _ = _run(_core(tiny), {"x": (prompts[0], SamplingParams(max_tokens=20, temperature=1.0,
                                                                        top_p=0.9, seed=4321, ignore_eos=True))})
    assert other_seed[("x", 0)] != alone[("x", 0)]


def test_n_choices_share_prompt_blocks(tiny):
    core = _core(tiny)
    prompt = random_prompts(1, 40, 40, 256, seed=12)[0]  # 2 full blocks + 8 tokens
    sp = SamplingParams(max_tokens=12, temperature=1.0, seed=7, n=3, ignore_eos=True)
    core.add_request("r", prompt, sp)
    core.step()  # prefill, fork, first token
    seqs = core.requests["r"]
    assert [s.index for s in seqs] == [0, 1, 2]
    shared = seqs[0].block_table[:2]
    assert all(s.block_table[:2] == shared for s in seqs)
    assert all(core.blocks.ref[b] == 3 for b in shared)
    assert len({s.block_table[2] for s in seqs}) == 3  # the partial block was copied per choice
    assert core.blocks.num_used == 2 + 3
    toks, last = {}, {}
    while core.has_work():
        for d in core.step():
            toks.setdefault(d.index, []).extend(d.token_ids)
            last[d.index] = d
    outs = [seqs[i].output_ids for i in range(3)]
    assert len({tuple(o) for o in outs}) == 3
    assert all(last[i].finish_reason == "length" and last[i].completion_tokens == 12 for i in range(3))
    assert core.blocks.num_used == 0
    single, _ = _run(_core(tiny), {"s": (prompt, SamplingParams(max_tokens=12, temperature=1.0, seed=7,
                                                                ignore_eos=True))})
    assert single[("s", 0)] == outs[0]


@pytest.mark.parametrize("kw", [dict(top_k=1), dict(min_p=1.0), dict(top_p=1e-6)])
def test_degenerate_filters_are_greedy(tiny, kw):
    model, _ = tiny
    prompt = random_prompts(1, 10, 10, 256, seed=13)[0]
    toks, _ = _run(_core(tiny), {"g": (prompt, SamplingParams(max_tokens=8, temperature=1.5, seed=3,
                                                              ignore_eos=True, **kw))})
    assert toks[("g", 0)] == reference_greedy(model, prompt, 8)


def test_filter_logits_values():
    logits = mx.log(mx.array([[0.4, 0.3, 0.2, 0.1]] * 3))
    out = filter_logits(logits, [2, 0, 0], [1.0, 0.5, 1.0], [0.0, 0.0, 0.45])
    keep = np.isfinite(np.array(out))
    assert keep.tolist() == [[True, True, False, False], [True, True, False, False],
                             [True, True, True, False]]


def test_penalties_arithmetic():
    seq = Sequence("r", [1, 2], SamplingParams(repetition_penalty=2.0, presence_penalty=0.5,
                                               frequency_penalty=0.25, logit_bias={4: 3.0}))
    seq.token_ids += [2, 3, 3]
    out = apply_penalties(mx.array([[1.0, 1.0, -1.0, 2.0, 0.0]]), [seq]).tolist()[0]
    # token 1: seen in prompt only -> 1/2; token 2: prompt+1 output -> -1*2 - 0.5 - 0.25;
    # token 3: 2 outputs -> 2/2 - 0.5 - 0.5; token 4: bias
    assert out == pytest.approx([1.0, 0.5, -2.75, 0.0, 3.0])


def test_logit_bias_and_repetition_penalty_steer_output(tiny):
    prompt = random_prompts(1, 12, 12, 256, seed=14)[0]
    toks, _ = _run(_core(tiny), {"b": (prompt, SamplingParams(max_tokens=6, temperature=0.7, seed=1,
                                                              logit_bias={77: 100.0}, ignore_eos=True))})
    assert toks[("b", 0)] == [77] * 6
    plain, _ = _run(_core(tiny), {"p": (prompt, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))})
    assert len(set(plain[("p", 0)])) < 40  # greedy on this model repeats itself
    pen, _ = _run(_core(tiny), {"p": (prompt, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True,
                                                             repetition_penalty=1e4))})
    out = pen[("p", 0)]
    assert len(set(out)) == 40 and not set(out) & set(prompt)


def test_logprobs_match_the_model(tiny):
    model, _ = tiny
    prompt = random_prompts(1, 9, 9, 256, seed=15)[0]
    _, last = _run(_core(tiny), {"l": (prompt, SamplingParams(max_tokens=1, temperature=0, logprobs=True,
                                                              top_logprobs=5))})
    lp = last[("l", 0)].logprobs[0]
    logits = model(mx.array(prompt), mx.arange(len(prompt)), ContiguousBackend([ContiguousKV(2)], [len(prompt)]),
                   logits_rows=mx.array([len(prompt) - 1]))[0]
    ref = np.array(logits - mx.logsumexp(logits))
    best = np.argsort(-ref)[:5]
    assert lp.token_id == int(best[0])
    assert [t for t, _ in lp.top] == best.tolist()
    assert lp.logprob == pytest.approx(float(ref[best[0]]), abs=1e-4)
    assert all(math.isclose(v, float(ref[t]), abs_tol=1e-4) for t, v in lp.top)


def test_stop_token_ids_and_max_tokens(tiny):
    model, _ = tiny
    prompt = random_prompts(1, 7, 7, 256, seed=16)[0]
    ref = reference_greedy(model, prompt, 10)
    stop_at = ref.index(ref[4])  # first occurrence of the 5th token
    toks, last = _run(_core(tiny), {"s": (prompt, SamplingParams(max_tokens=10, temperature=0,
                                                                 stop_token_ids=[ref[4]]))})
    assert toks[("s", 0)] == ref[:stop_at + 1]
    assert last[("s", 0)].finish_reason == "stop"
    toks, last = _run(_core(tiny), {"m": (prompt, SamplingParams(max_tokens=3, temperature=0))})
    assert toks[("m", 0)] == ref[:3] and last[("m", 0)].finish_reason == "length"
