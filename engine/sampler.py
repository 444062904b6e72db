"""Vectorised sampling over a step's logits, one row per sequence.

Order per row: repetition / presence / frequency penalties and logit_bias, grammar mask,
(logprobs are taken here), temperature, top_k, top_p, min_p, then a Gumbel-max draw with the
sequence's own PRNG key, so a seeded request samples the same tokens whatever else is batched.
Temperature 0 is greedy (argmax of the penalised, masked logits).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .sampling_params import TokenLogprob
from .sequence import Sequence

NEG_INF = float("-inf")


def _penalty_arrays(seqs: list[Sequence], vocab: int):
    """(multiplicative repetition penalty per seen token, additive adjustment) as numpy [S, V],
    or None for each when no sequence asks for it."""
    rep = add = None
    for r, seq in enumerate(seqs):
        p = seq.params
        if p.repetition_penalty != 1.0:
            if rep is None:
                rep = np.ones((len(seqs), vocab), dtype=np.float32)
            seen = np.unique(np.asarray(seq.token_ids, dtype=np.int64))
            rep[r, seen[seen < vocab]] = p.repetition_penalty
        if p.presence_penalty or p.frequency_penalty or p.logit_bias:
            if add is None:
                add = np.zeros((len(seqs), vocab), dtype=np.float32)
            if p.presence_penalty or p.frequency_penalty:
                out = np.asarray(seq.output_ids, dtype=np.int64)
                counts = np.bincount(out[out < vocab], minlength=vocab)[:vocab].astype(np.float32)
                add[r] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
            for tok, bias in p.logit_bias.items():
                if not 0 <= tok < vocab:
                    raise ValueError(f"logit_bias token id {tok} is outside the vocabulary (size {vocab})")
                add[r, tok] += bias
    return rep, add


def apply_penalties(logits: mx.array, seqs: list[Sequence]) -> mx.array:
    rep, add = _penalty_arrays(seqs, logits.shape[-1])
    if rep is not None:
        rep = mx.array(rep)
        logits = mx.where(logits > 0, logits / rep, logits * rep)
    if add is not None:
        logits = logits + mx.array(add)
    return logits


def filter_logits(scaled: mx.array, top_k: list[int], top_p: list[float], min_p: list[float]) -> mx.array:
    """Set to -inf every logit that top_k / top_p / min_p rule out (row-wise parameters)."""
    vocab = scaled.shape[-1]
    if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
        srt = -mx.sort(-scaled, axis=-1)  # descending
        if any(k > 0 for k in top_k):
            kth = mx.array([min(k, vocab) - 1 if k > 0 else vocab - 1 for k in top_k])
            thresh = mx.take_along_axis(srt, kth[:, None], axis=-1)
            scaled = mx.where(scaled < thresh, NEG_INF, scaled)
            srt = mx.where(mx.arange(vocab)[None, :] > kth[:, None], NEG_INF, srt)
        if any(p < 1.0 for p in top_p):
            probs = mx.softmax(srt, axis=-1)
            before = mx.cumsum(probs, axis=-1) - probs  # mass strictly above each sorted entry
            keep = before < mx.array(top_p)[:, None]
            last = mx.maximum(keep.astype(mx.int32).sum(axis=-1) - 1, 0)
            thresh = mx.take_along_axis(srt, last[:, None], axis=-1)
            scaled = mx.where(scaled < thresh, NEG_INF, scaled)
    if any(m > 0 for m in min_p):
        probs = mx.softmax(scaled, axis=-1)
        floor = probs.max(axis=-1, keepdims=True) * mx.array(min_p)[:, None]
        scaled = mx.where(probs < floor, NEG_INF, scaled)
    return scaled


def _gumbel(seqs: list[Sequence], vocab: int) -> mx.array:
    rows = []
    for seq in seqs:
        keys = mx.random.split(seq.rng_key)
        seq.rng_key = keys[0]
        rows.append(mx.random.gumbel(shape=(vocab,), key=keys[1]))
    return mx.stack(rows)


def draw_tokens(logits: mx.array, seqs: list[Sequence]) -> mx.array:
    """Token ids [S] (lazy): argmax for greedy rows (temperature 0), else a Gumbel-max draw from the
    temperature-scaled logits after top-k / top-p / min-p (each sampled row advances its own key)."""
    greedy = [s.params.temperature == 0 for s in seqs]
    tokens = mx.argmax(logits, axis=-1)
    if all(greedy):
        return tokens
    idx = [r for r, g in enumerate(greedy) if not g]
    sub = seqs if len(idx) == len(seqs) else [seqs[r] for r in idx]
    rows = logits if len(idx) == len(seqs) else logits[mx.array(idx)]
    temps = mx.array([s.params.temperature for s in sub])[:, None]
    scaled = filter_logits(rows / temps, [s.params.top_k for s in sub], [s.params.top_p for s in sub],
                           [s.params.min_p for s in sub])
    drawn = mx.argmax(scaled + _gumbel(sub, logits.shape[-1]), axis=-1)
    if len(idx) == len(seqs):
        return drawn
    tokens[mx.array(idx)] = drawn
    return tokens


def sample(logits: mx.array, seqs: list[Sequence], masks: np.ndarray | None = None):
    """logits [S, V] float32 (row r belongs to seqs[r]); masks: optional bool numpy [S, V] of
    allowed tokens (grammar). Returns (token ids, per-row TokenLogprob or None)."""
    logits = apply_penalties(logits, seqs)
    if masks is not None:
        logits = mx.where(mx.array(masks), logits, NEG_INF)
    want_lp = [s.params.logprobs or s.params.top_logprobs > 0 for s in seqs]
    lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True) if any(want_lp) else None
    toks = draw_tokens(logits, seqs).tolist()
    out_lp: list[TokenLogprob | None] = [None] * len(seqs)
    if lp is not None:
        rows_np = np.array(lp[mx.array([r for r, w in enumerate(want_lp) if w])])
        j = 0
        for r, w in enumerate(want_lp):
            if not w:
                continue
            row, n = rows_np[j], seqs[r].params.top_logprobs
            j += 1
            top = []
            if n > 0:
                cand = np.argpartition(-row, n - 1)[:n]
                cand = cand[np.argsort(-row[cand], kind="stable")]
                top = [(int(t), float(row[t])) for t in cand if np.isfinite(row[t])]  # masked: -inf
            out_lp[r] = TokenLogprob(toks[r], float(row[toks[r]]), top)
    return toks, out_lp
