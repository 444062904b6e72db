"""The attention-backend contract between models and KV caches, and a simple contiguous backend.

Models run on a *flat batch*: the new tokens of every sequence in the step are laid end to end
(T tokens in all), with a position per token. A model never owns a cache: each attention layer
hands its new keys and values to the backend, which stores them and returns the attention output.

    out = backend.attend(layer, q, k, v, scale=..., window=...)
        q: [T, Hq, D]    k, v: [T, Hkv, D]   (RoPE already applied)   ->   out: [T, Hq, D]

`StepLayout` says how the T tokens split into sequences: `query_lens[i]` new tokens of sequence i,
and `context_lens[i]` tokens in its KV after this step (so its new tokens sit at positions
context_lens[i] - query_lens[i] ... context_lens[i] - 1 of its cache).

The paged backend (engine/paged_attention.py) keeps the same contract over a block pool.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import mlx.core as mx


@dataclass
class StepLayout:
    query_lens: list[int]
    context_lens: list[int]

    def __post_init__(self):
        if len(self.query_lens) != len(self.context_lens):
            raise ValueError("query_lens and context_lens differ in length")
        for q, c in zip(self.query_lens, self.context_lens):
            if q < 0 or c < q:
                raise ValueError(f"bad step layout: query_len {q}, context_len {c}")

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens)

    def offsets(self) -> list[int]:
        """Start index of each sequence's tokens in the flat batch."""
        out, acc = [], 0
        for q in self.query_lens:
            out.append(acc)
            acc += q
        return out


class AttentionBackend(Protocol):
    layout: StepLayout

    def attend(
        self,
        layer: int,
        q: mx.array,
        k: mx.array,
        v: mx.array,
        *,
        scale: float,
        window: int | None = None,
    ) -> mx.array: ...


def causal_mask(q_len: int, kv_len: int, window: int | None = None) -> mx.array | None:
    """Boolean [q_len, kv_len] mask: query i (at absolute position kv_len - q_len + i) sees key j
    when j <= its position and, with a sliding window, j > position - window. None = no masking."""
    offset = kv_len - q_len
    if q_len == 1 and (window is None or kv_len <= window):
        return None
    qpos = mx.arange(q_len)[:, None] + offset
    kpos = mx.arange(kv_len)[None, :]
    mask = kpos <= qpos
    if window is not None:
        mask = mask & (kpos > qpos - window)
    return mask


def attend_one(q: mx.array, k: mx.array, v: mx.array, scale: float, window: int | None = None) -> mx.array:
    """Attention of one sequence. q: [Tq, Hq, D]; k, v: [L, Hkv, D] (the whole context, new tokens
    last). GQA is handled by the fused kernel. Returns [Tq, Hq, D]."""
    tq, lk = q.shape[0], k.shape[0]
    mask = causal_mask(tq, lk, window)
    qh = q.transpose(1, 0, 2)[None]
    kh = k.transpose(1, 0, 2)[None]
    vh = v.transpose(1, 0, 2)[None]
    out = mx.fast.scaled_dot_product_attention(qh, kh, vh, scale=scale, mask=mask)
    return out[0].transpose(1, 0, 2)


@dataclass
class ContiguousKV:
    """One sequence's cache: per layer, keys and values as [L, Hkv, D] arrays grown by concatenation."""

    num_layers: int
    keys: list = field(default_factory=list)
    values: list = field(default_factory=list)

    def __post_init__(self):
        self.keys = [None] * self.num_layers
        self.values = [None] * self.num_layers

    @property
    def length(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[0]

    def append(self, layer: int, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        if self.keys[layer] is None:
            self.keys[layer], self.values[layer] = k, v
        else:
            self.keys[layer] = mx.concatenate([self.keys[layer], k], axis=0)
            self.values[layer] = mx.concatenate([self.values[layer], v], axis=0)
        return self.keys[layer], self.values[layer]


class ContiguousBackend:
    """Backend over one ContiguousKV per sequence. Simple and exact; the engine uses the paged one."""

    def __init__(self, caches: list[ContiguousKV], query_lens: list[int]):
        if len(caches) != len(query_lens):
            raise ValueError("one cache per sequence is needed")
        self.caches = caches
        self.layout = StepLayout(list(query_lens), [c.length + q for c, q in zip(caches, query_lens)])

    def attend(self, layer, q, k, v, *, scale, window=None):
        outs = []
        for cache, start, n in zip(self.caches, self.layout.offsets(), self.layout.query_lens):
            if n == 0:
                continue
            keys, values = cache.append(layer, k[start : start + n], v[start : start + n])
            outs.append(attend_one(q[start : start + n], keys, values, scale, window))
        return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=0)
