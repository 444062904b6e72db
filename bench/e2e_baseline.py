"""The mlx-lm 0.32.2 side of bench/e2e_gpu.py: its uniform 4-bit model and its timed runs
(generate_step at batch 1, BatchGenerator for many sequences), and the summary both engines' runs share."""

from __future__ import annotations

import time

import mlx.core as mx
import mlx.nn as nn


def mlx_lm_4bit(cfg: dict, weights: dict):
    from mlx_lm.models import llama

    model = llama.Model(llama.ModelArgs.from_dict(cfg))
    model.load_weights(list(weights.items()), strict=True)
    nn.quantize(model, group_size=64, bits=4)
    mx.eval(model.parameters())
    return model


def run_mlx_lm_batch(model, prompts, gen) -> dict:
    from mlx_lm.generate import BatchGenerator

    g = BatchGenerator(model, max_tokens=gen, completion_batch_size=len(prompts),
                       prefill_batch_size=min(len(prompts), 8))
    mx.synchronize()
    t0 = time.perf_counter()
    uids = g.insert(prompts, [gen] * len(prompts))
    first, count, steps = {}, 0, []
    while responses := g.next_generated():
        now = time.perf_counter()
        count += len(responses)
        steps.append((now, len(responses)))
        for r in responses:
            first.setdefault(r.uid, now)
    g.close()
    del uids
    return summarize(t0, first, steps, count, len(prompts), gen)


def summarize(t0, first, steps, count, nseq, gen) -> dict:
    t_end = steps[-1][0]
    t_all_first = max(first.values())
    dec_tok = sum(n for t, n in steps if t > t_all_first)
    dec_s = t_end - t_all_first
    return dict(sequences=nseq, gen_tokens=gen, generated=count, wall_s=round(t_end - t0, 4),
                tok_s=round(count / (t_end - t0), 2), ttft_first_s=round(min(first.values()) - t0, 4),
                all_first_s=round(t_all_first - t0, 4), decode_tokens=dec_tok, decode_s=round(dec_s, 4),
                decode_tok_s=round(dec_tok / dec_s, 2) if dec_s > 0 else None, steps=len(steps))


def run_mlx_lm_single(model, prompt, gen) -> dict:
    from mlx_lm.generate import generate_step

    mx.synchronize()
    t0 = time.perf_counter()
    t1, n = None, 0
    for tok, _ in generate_step(mx.array(prompt), model, max_tokens=gen):
        n += 1
        if t1 is None:
            t1 = time.perf_counter()
    t_end = time.perf_counter()
    return dict(sequences=1, gen_tokens=gen, generated=n, wall_s=round(t_end - t0, 4),
                ttft_first_s=round(t1 - t0, 4), decode_tokens=n - 1, decode_s=round(t_end - t1, 4),
                decode_tok_s=round((n - 1) / (t_end - t1), 2), tok_s=round(n / (t_end - t0), 2))
