"""Warm a model's engine up before the server reports it ready.

On a GPU, MLX and our CUDA kernels compile each kernel variant on first use (a few seconds each):
without this, the first requests at each batch size pay those compiles (measured on an H100: 17 tok/s
instead of ~700 at 16 clients on the first pass). Warm-up runs real generations through the engine's
public API, `batch` requests at a time for batch = 1, 2, 4, ... up to max_num_seqs, so every decode
batch bucket and a prefill of several prompts compile before /health says 200. On the CPU there is
nothing to compile and it is skipped (set JANG_SERVE_WARMUP=1 to force it, =0 to turn it off).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

log = logging.getLogger("jang_serve.server")


def wanted() -> bool:
    env = os.environ.get("JANG_SERVE_WARMUP")
    if env is not None:
        return env not in ("0", "", "false", "no")
    import mlx.core as mx

    return mx.default_device() == mx.gpu


def batch_sizes(max_num_seqs: int) -> list[int]:
    sizes, b = [], 1
    while b < max_num_seqs:
        sizes.append(b)
        b *= 2
    return sizes + [max_num_seqs]


async def _round(engine, batch: int, prompt_len: int, max_tokens: int, vocab: int, tag: str) -> int:
    from jang_serve.engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)

    async def one(i: int) -> int:
        # distinct prompts (no prefix-cache hits), token ids spread over the vocabulary
        ids = [(7919 * (i + 1) + 104729 * j + batch) % vocab for j in range(prompt_len)]
        n = 0
        async for d in engine.generate(ids, params, f"warmup-{tag}-{batch}-{i}"):
            n += len(d.token_ids)
        return n

    return sum(await asyncio.gather(*(one(i) for i in range(batch))))


def warm_up(engine, max_num_seqs: int, vocab_size: int, prompt_len: int = 24, max_tokens: int = 4) -> dict:
    """Run the warm-up rounds (blocking; from a thread without a running event loop).
    Returns {"batches": [...], "tokens": generated, "seconds": total}."""
    t0 = time.perf_counter()
    sizes = batch_sizes(max(1, max_num_seqs))
    vocab = max(2, int(vocab_size))
    prompt_len = max(1, min(prompt_len, int(getattr(engine, "max_model_len", prompt_len + max_tokens + 1))
                            - max_tokens - 1))

    async def run() -> int:
        total = 0
        for b in sizes:
            total += await _round(engine, b, prompt_len, max_tokens, vocab, str(os.getpid()))
        return total

    tokens = asyncio.run(run())
    out = {"batches": sizes, "tokens": tokens, "seconds": round(time.perf_counter() - t0, 2)}
    log.info("warm-up: batches %s, %d tokens in %.1f s", sizes, tokens, out["seconds"])
    return out
