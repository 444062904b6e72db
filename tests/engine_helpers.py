"""Shared helpers for the engine tests: tiny random models and a cache-free reference decoder."""

from __future__ import annotations

import random

import mlx.core as mx

from jang_serve.engine.attention import ContiguousBackend, ContiguousKV
from jang_serve.engine.models import build_model


def tiny_config(**kw) -> dict:
    cfg = dict(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
               num_attention_heads=4, num_key_value_heads=2, vocab_size=256, max_position_embeddings=4096,
               rms_norm_eps=1e-5)
    cfg.update(kw)
    return cfg


def tiny_model(seed: int = 0, **kw):
    cfg = tiny_config(**kw)
    mx.random.seed(seed)
    model = build_model(cfg)
    # Sharper logits than the default init, so greedy choices are far from ties.
    model.update({"lm_head": {"weight": model.lm_head.weight * 8}} if "lm_head" in model else {})
    mx.eval(model.parameters())
    return model, cfg


def reference_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding of one sequence through the simple contiguous cache (the oracle)."""
    cache, out, x = ContiguousKV(model.num_layers), [], list(prompt)
    for _ in range(n):
        start = cache.length
        be = ContiguousBackend([cache], [len(x)])
        logits = model(mx.array(x, dtype=mx.int32), mx.arange(start, start + len(x)), be,
                       logits_rows=mx.array([len(x) - 1]))
        t = int(mx.argmax(logits[0]))
        out.append(t)
        x = [t]
    return out


def random_prompts(n: int, lo: int, hi: int, vocab: int, seed: int = 1) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]
