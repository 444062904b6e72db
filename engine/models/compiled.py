"""Decode blocks as compiled graphs: fewer Python calls per step on a GPU.

Building a decode step's lazy graph op by op in Python costs ~0.2 ms per layer (7 ms for a
32-layer model at batch 1, as long as the GPU takes to run it). `compile_blocks(model)` wraps
each plain decoder Block in two `mx.compile`d halves around attention:
  pre(x, positions)  -> q, k, v     input norm, q/k/v projections, q/k norm, RoPE
  post(x, o)         -> block out   o_proj + residual, post-attention norm, MLP + residual
Attention itself (KV write, paged kernels over block tables whose width changes every few
tokens) stays eager. MLX traces each half once per token count and replays the recorded graph
afterwards (and fuses its elementwise ops). Only decode steps of up to `max_tokens` sequences use it; the first call at a new token count runs eagerly, so one-time work the kernels
do at first use (route choice, self-tests that evaluate arrays) never happens inside a trace.
"""

from __future__ import annotations

import mlx.core as mx

from .decoder import Attention, Block


class CompiledBlock:
    def __init__(self, block: Block, max_tokens: int):
        self.block, self.max_tokens = block, max_tokens
        self.seen: set[tuple] = set()
        self.calls = 0
        attn, mlp = block.self_attn, getattr(block, block.mlp_name)

        def pre(x, positions):
            return attn.qkv(block.input_layernorm(x), positions)

        def post(x, o):
            h = x + attn.o_proj(o.reshape(x.shape[0], -1))
            return h + mlp(block.post_attention_layernorm(h))

        self.pre, self.post = mx.compile(pre), mx.compile(post)

    def takes(self, x: mx.array, attn) -> bool:
        """Compiled path for this input? Decode steps only (one token per sequence: prefill token
        counts vary too much to trace each); the first call per (tokens, dtype) runs eagerly."""
        layout = getattr(attn, "layout", None)
        if x.shape[0] > self.max_tokens or layout is None or len(layout.query_lens) != x.shape[0]:
            return False
        key = (x.shape, x.dtype)
        if key in self.seen:
            return True
        self.seen.add(key)
        return False

    def __call__(self, x, positions, attn_backend):
        a = self.block.self_attn
        self.calls += 1
        q, k, v = self.pre(x, positions)
        o = attn_backend.attend(a.layer, q, k, v, scale=a.scale, window=a.window)
        return self.post(x, o)


def compilable(block) -> bool:
    """Plain decoder blocks only: families that override a block's or attention's call, and
    tensor-parallel shards (collectives inside), keep the eager path."""
    if not isinstance(block, Block) or type(block).__call__ is not Block.__call__:
        return False
    if type(block.self_attn).__call__ is not Attention.__call__:
        return False
    return not any(type(m).__module__.startswith("jang_serve.engine.distributed") for _, m in block.named_modules())


def compile_blocks(model, max_tokens: int = 256, on: bool = True) -> int:
    """Give every compilable block of `model` its compiled halves (on=False: take them away);
    returns how many blocks changed."""
    n = 0
    for block in getattr(getattr(model, "model", None), "layers", []):
        if on and compilable(block) and block.compiled is None:
            block.compiled = CompiledBlock(block, max_tokens)
            n += 1
        elif not on and block.compiled is not None:
            del block.compiled  # back to the class default (eager)
            n += 1
    return n
