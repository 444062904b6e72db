"""Decode steps as compiled graphs: fewer Python calls and fewer graph nodes per step on a GPU.

Building a decode step's lazy graph op by op in Python costs ~0.2 ms per layer (7 ms for a
32-layer model at batch 1, as long as the GPU takes to run it). `compile_blocks(model)` wraps
each plain decoder Block in two `mx.compile`d halves around attention:
  pre(x, positions)  -> q, k, v     input norm, q/k/v projections, q/k norm, RoPE
  post(x, o)         -> block out   o_proj + residual, post-attention norm, MLP + residual
Where the block is plain enough (RMSNorm, fused quantized q/k/v and gate/up, SwiGLU, no biases),
the norms, the SwiGLU and the residual adds go inside the quantized matmuls (kernels.qmm_fused:
one GPU op instead of two or three at decode sizes).
A decode step then runs in one of two ways (`decode_chain`):
  - the first step at a (token count, block-table width): block by block, attention eager between
    the compiled halves (block i's post is linked with block i+1's pre: one call per layer), so the
    kernels' one-time work at first use (route choice, self-tests that evaluate arrays) never
    happens inside a trace;
  - every later step ("folded"): the KV write and the paged decode attention go inside the traced
    graph too: one compiled call per layer and nothing eager between them (the whole chain as ONE
    compiled call was measured no faster, bench/results/e2e-h100.json other_runs
    "fde611b-fresh-processes", and was dropped). Past the GEMV rows a link ends in the next block's input norm
    (kernels/gemm_epilogue.py) and its q/k/v GEMM's partials go through RoPE and the KV store in one kernel
    (kernels/qkv_epilogue.py). Block tables are padded to a few widths
    (engine/model_runner.table_width), so a sequence's growth retraces every 16 blocks at most.
    Paged pools without a KV transform only.
MLX traces once per input shapes and replays the recorded graph afterwards (and fuses its elementwise
ops). Measured on the H100 at batch 1 (Llama-3-8B shapes, bench/results/decode-anatomy-h100.json): the
host's graph building fell from ~1.9 ms to ~0.5-0.8 ms per step and the graph from 909 to ~400 nodes.
"""
from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from jang_serve.kernels import gemm_epilogue, paged_attention_decode, qkv_epilogue, qkv_store
from jang_serve.kernels.qmm import GEMV_ROWS
from jang_serve.kernels.qkv_epilogue import qkv_rope_store_rows
from jang_serve.kernels.qkv_store import qkv_rope_store
from jang_serve.kernels.qmm_fused import qkv_rope, qmm_fused, rope_inv_freq

from ..paged_attention import write_kv_before
from .decoder import MLP, Attention, Block
from .layers import FusedLinear, QLinear, RoPE


class CompiledBlock:
    def __init__(self, block: Block, max_tokens: int):
        self.block, self.max_tokens = block, max_tokens
        self.seen: set[tuple] = set()
        self.calls = 0
        attn, mlp = block.self_attn, getattr(block, block.mlp_name)
        ln, post_ln = block.input_layernorm, block.post_attention_layernorm
        # Norms and residuals folded into the quantized matmuls (kernels.qmm_fused): fewer GPU ops per layer
        norm_qkv = _plain_norm(ln) and attn.joint_rope_ok() and _plain_q(attn.qkv_fused)
        swiglu = (type(mlp) is MLP and _plain_norm(post_ln) and mlp.act is nn.silu
                  and "gate_up_fused" in mlp and _plain_q(mlp.gate_up_fused))
        rope_inv = _rope_inv_freq(attn) if norm_qkv else None  # RoPE inside the q/k/v matmul too
        self.fused = dict(norm_qkv=norm_qkv, swiglu=swiglu, rope=rope_inv is not None)

        def pre(x, positions):
            if norm_qkv and rope_inv is not None:
                q = attn.qkv_fused
                return qkv_rope(x, q.weight, q.scales, q.biases, q.bits, q.group_size, n_heads=attn.n_heads,
                                n_kv=attn.n_kv, head_dim=attn.hd, positions=positions, inv_freq=rope_inv,
                                rope=attn.rope, norm_weight=ln.weight, eps=ln.eps)
            if norm_qkv:
                q = attn.qkv_fused
                y = qmm_fused(x, q.weight, q.scales, q.biases, q.bits, q.group_size, norm_weight=ln.weight, eps=ln.eps)
                return attn.split_rotate(y, positions)
            return attn.qkv(ln(x), positions)

        def post(x, o):
            h = _plus(attn.o_proj, o.reshape(x.shape[0], -1), x)
            if swiglu:
                g = mlp.gate_up_fused
                a = qmm_fused(h, g.weight, g.scales, g.biases, g.bits, g.group_size, norm_weight=post_ln.weight,
                              eps=post_ln.eps, swiglu=True)
                return _plus(mlp.down_proj, a, h)
            return h + mlp(post_ln(h))

        def pre_store(x, positions, kv, blk, off, kv_quant):
            """pre, with the layer's k and v stored into its plain pools by the q/k/v kernel itself where
            kernels/qkv_store.py serves (after its eager self-test): (q, k, v, stored)."""
            if norm_qkv and rope_inv is not None and kv_quant is None:
                q = attn.qkv_fused
                r = qkv_rope_store(x, q.weight, q.scales, q.biases, q.bits, q.group_size, n_heads=attn.n_heads,
                                   n_kv=attn.n_kv, head_dim=attn.hd, positions=positions, inv_freq=rope_inv,
                                   k_pool=kv[0], v_pool=kv[1], blocks=blk, offsets=off, norm_weight=ln.weight,
                                   eps=ln.eps)
                if r is not None:
                    return (*r, True)
            return (*pre(x, positions), False)

        def pre_normed(xn, positions):
            """pre on an input already normed by the previous block's epilogue (post_n)."""
            if norm_qkv and rope_inv is not None:
                q = attn.qkv_fused
                return qkv_rope(xn, q.weight, q.scales, q.biases, q.bits, q.group_size, n_heads=attn.n_heads,
                                n_kv=attn.n_kv, head_dim=attn.hd, positions=positions, inv_freq=rope_inv,
                                rope=attn.rope)
            if norm_qkv:
                return attn.split_rotate(attn.qkv_fused.joint(xn), positions)
            return attn.qkv(xn, positions)

        def pre_normed_store(xn, positions, kv, blk, off, kv_quant):
            """pre_normed, with the layer's k and v stored into its plain pools by the q/k/v GEMM's epilogue kernel
            where kernels/qkv_epilogue.py serves (after its eager self-test): (q, k, v, stored)."""
            if norm_qkv and kv_quant is None:
                q = attn.qkv_fused
                r = qkv_rope_store_rows(xn, q.weight, q.scales, q.biases, q.bits, q.group_size, n_heads=attn.n_heads,
                                        n_kv=attn.n_kv, head_dim=attn.hd, positions=positions, rope=attn.rope,
                                        k_pool=kv[0], v_pool=kv[1], blocks=blk, offsets=off)
                if r is not None:
                    return (*r, True)
            return (*pre_normed(xn, positions), False)

        def post_n(x, o, norm_next):
            """post, and norm_next applied to its output: (h, norm_next(h)). Each residual add and the norm
            after it are one epilogue kernel after a quantized GEMM where that serves (kernels/gemm_epilogue.py)."""
            h, hn = _plus_norm(attn.o_proj, o.reshape(x.shape[0], -1), x, post_ln)
            return _plus_norm(mlp.down_proj, mlp.hidden(hn), h, norm_next)

        self.pre_eager, self.post_eager, self.pre_store = pre, post, pre_store
        self.pre_normed, self.pre_normed_store, self.post_n = pre_normed, pre_normed_store, post_n
        # post_n serves the links of steps with more rows than the fused decode GEMVs take (models/compiled.py
        # _norm_ahead): a plain MLP between plain RMSNorms
        self.norm_ahead_ok = type(mlp) is MLP and _plain_norm(post_ln)
        self.pre, self.post = mx.compile(pre), mx.compile(post)
        self.link = None  # post of this block + pre of the next, one compiled call (set by compile_blocks)
        self.next: CompiledBlock | None = None
        self._att: dict = {}  # kv_quant -> compiled (pre + attention) / (link + attention) of this block
        self.seen_att: set[tuple] = set()  # step keys whose first call ran the unfolded chain (block 0 only)
        self.folded_calls = 0  # steps that ran with the attention folded in (block 0 counts them)

    def attend_eager(self, kv_quant):
        """f(q, k, v, blk, off, tables, lens, *kv) -> (o, *kv'): this block's KV write and paged decode
        attention as plain MLX calls (kv: the layer's K pool parts, then V's; launch arguments of the
        kernels depend only on shapes, so the function can be traced)."""
        a = self.block.self_attn
        nk = 1 if kv_quant is None else 3

        def att(q, k, v, blk, off, tables, lens, *kv, stored=False):
            kp, vp = _pool(kv[:nk]), _pool(kv[nk:])
            if not stored:   # stored: the q/k/v kernel wrote k and v already (pre_store)
                q, kp, vp = write_kv_before(q, kp, vp, k, v, (blk, off), kv_quant)
            o = paged_attention_decode(q, kp, vp, tables, lens, a.scale, a.window, kv_quant)
            return (o, *_flat(kp), *_flat(vp))
        return att

    def folded(self, kv_quant, first: bool):
        """Compiled step pieces with the attention inside (one compiled call per layer, nothing eager):
        first=True:  g(x, positions, blk, off, tables, lens, *kv)        -> (o, *kv')        pre + attention
        first=False: g(x, o, positions, blk, off, tables, lens, *kv_next) -> (h, o', *kv_next') post + the
                     next block's pre + attention"""
        key = (kv_quant, first)
        fn = self._att.get(key)
        if fn is None:
            if first:
                pre, att = self.pre_store, self.attend_eager(kv_quant)

                def g(x, positions, blk, off, tables, lens, *kv):
                    q, k, v, stored = pre(x, positions, kv, blk, off, kv_quant)
                    return att(q, k, v, blk, off, tables, lens, *kv, stored=stored)
            else:
                post, pre, att = self.post_eager, self.next.pre_store, self.next.attend_eager(kv_quant)
                nxt = self.next

                def g(x, o, positions, blk, off, tables, lens, *kv):
                    if _norm_ahead(self, x):
                        h, hn = self.post_n(x, o, nxt.block.input_layernorm)
                        q, k, v, stored = nxt.pre_normed_store(hn, positions, kv, blk, off, kv_quant)
                        return (h, *att(q, k, v, blk, off, tables, lens, *kv, stored=stored))
                    h = post(x, o)
                    q, k, v, stored = pre(h, positions, kv, blk, off, kv_quant)
                    return (h, *att(q, k, v, blk, off, tables, lens, *kv, stored=stored))
            fn = self._att[key] = mx.compile(g)
        return fn

    def link_to(self, nxt: "CompiledBlock") -> None:
        self.next = nxt
        post, pre = self.post_eager, nxt.pre_eager

        def link(x, o, positions):
            if _norm_ahead(self, x):
                h, hn = self.post_n(x, o, nxt.block.input_layernorm)
                return (h, *nxt.pre_normed(hn, positions))
            h = post(x, o)
            return (h, *pre(h, positions))

        self.link = mx.compile(link)

    def takes(self, x: mx.array, attn) -> bool:
        """Compiled path for this input? Decode steps only (one token per sequence: prefill token
        counts vary too much to trace each)."""
        layout = getattr(attn, "layout", None)
        return x.shape[0] <= self.max_tokens and layout is not None and len(layout.query_lens) == x.shape[0]

    def __call__(self, x, positions, attn_backend):
        a = self.block.self_attn
        key = (x.shape, x.dtype)
        if key in self.seen:
            self.calls += 1
            pre, post = self.pre, self.post
        else:  # the first call per (tokens, dtype) runs the same halves eagerly: kernels' first-use
            self.seen.add(key)  # work (route choice, self-tests that evaluate arrays) stays out of the trace
            pre, post = self.pre_eager, self.post_eager
            if self.fused["rope"]:   # the folded steps' q/k/v + KV store (kernels/qkv_store.py)
                qf = a.qkv_fused
                qkv_store.ready(x.dtype, qf.bits, qf.group_size, a.n_heads, a.n_kv, a.hd, norm=True)
            if _norm_ahead(self, x):   # the links' residual + norm epilogue (kernels/gemm_epilogue.py)
                gemm_epilogue.ready(x.dtype, self.block.post_attention_layernorm.eps)
            if self.fused["norm_qkv"] and x.shape[0] > GEMV_ROWS:   # the folded links' q/k/v epilogue
                qkv_epilogue.ready(x.dtype, a.n_heads, a.n_kv, a.hd, a.rope)
        q, k, v = pre(x, positions)
        o = attn_backend.attend(a.layer, q, k, v, scale=a.scale, window=a.window)
        return post(x, o)


def decode_chain(blocks, x, positions, attn_backend):
    """All blocks of a decode step with one compiled call per layer instead of two: pre(0), then per
    layer attention and `link` (its post + the next block's pre). None when the step does not
    qualify (a block without compiled halves, or the first step at this token count: the caller then
    runs the blocks one by one, whose eager first calls do the kernels' first-use work).
    On a paged, decode-only step without a KV transform the attention goes inside the compiled calls
    too (`CompiledBlock.folded`): the first step at each (tokens, table width) runs the unfolded chain
    (kernels' first-use work stays eager), later ones make 33 compiled calls and no eager op per layer."""
    if not blocks or any(b.compiled is None or b.compiled.link is None for b in blocks[:-1]) \
            or blocks[-1].compiled is None:
        return None
    key = (x.shape, x.dtype)
    first, last = blocks[0].compiled, blocks[-1].compiled
    if not first.takes(x, attn_backend) or key not in first.seen or key not in last.seen:
        return None
    pool = getattr(attn_backend, "pool", None)
    if getattr(attn_backend, "decode_only", False) and pool is not None and pool.transform is None:
        fkey = (key, attn_backend.block_tables.shape, pool.kv_quant)
        if fkey in first.seen_att:
            return _folded_chain(blocks, x, positions, attn_backend)
        first.seen_att.add(fkey)
    q, k, v = first.pre(x, positions)
    for i, b in enumerate(blocks):
        c, a = b.compiled, b.self_attn
        c.calls += 1
        o = attn_backend.attend(a.layer, q, k, v, scale=a.scale, window=a.window)
        if i + 1 < len(blocks):
            x, q, k, v = c.link(x, o, positions)
        else:
            x = c.post(x, o)
    return x


def _folded_chain(blocks, x, positions, be):
    pool, kvq = be.pool, be.pool.kv_quant
    step = (*be.slots, be.block_tables, be.context_lens_arr)
    n = 1 if kvq is None else 3

    def parts(layer):
        return (*_flat(pool.k[layer]), *_flat(pool.v[layer]))

    def store(layer, kv):
        pool.k[layer], pool.v[layer] = _pool(kv[:n]), _pool(kv[n:])

    first = blocks[0].compiled
    first.folded_calls += 1
    layers = [b.self_attn.layer for b in blocks]
    o, *kv = first.folded(kvq, True)(x, positions, *step, *parts(layers[0]))
    store(layers[0], kv)
    for i, b in enumerate(blocks):
        c = b.compiled
        c.calls += 1
        if i + 1 < len(blocks):
            x, o, *kv = c.folded(kvq, False)(x, o, positions, *step, *parts(layers[i + 1]))
            store(layers[i + 1], kv)
        else:
            x = c.post(x, o)
    return x


def _norm_ahead(c: CompiledBlock, x) -> bool:
    """Whether c's links end in post_n (its output and the next block's input norm at once): more rows than the
    fused decode GEMVs take (kernels.qmm_fused folds the norms into those), and plain norms on both sides."""
    nxt = c.next
    return (x.shape[0] > GEMV_ROWS and c.norm_ahead_ok and nxt is not None
            and _plain_norm(nxt.block.input_layernorm))


def _plus_norm(lin, a, r, norm):
    """(r + lin(a), norm(r + lin(a))): after a plain quantized linear, one epilogue kernel where it serves."""
    if type(lin) is QLinear and "bias" not in lin and _plain_norm(norm):
        return gemm_epilogue.qmm_add_norm(a, lin.weight, lin.scales, lin.biases, lin.bits, lin.group_size, r,
                                          norm.weight, norm.eps)
    h = _plus(lin, a, r)
    return h, norm(h)


def _flat(p):
    return p if isinstance(p, tuple) else (p,)


def _pool(parts):
    return parts[0] if len(parts) == 1 else tuple(parts)


def _rope_inv_freq(attn):
    """The per-pair angle rates of a plain (non-traditional, full head) RoPE, else None."""
    rope = attn.rope
    if type(rope) is not RoPE or rope.traditional or rope.dims != attn.hd:
        return None
    inv = rope_inv_freq(rope.dims, rope.base, rope.scale, rope._freqs)
    mx.eval(inv)  # made here, used from the engine's thread
    return inv


def _plain_norm(m) -> bool:
    return type(m) is nn.RMSNorm


def _plain_q(lin) -> bool:
    """A quantized linear (or fused group) without bias: its matmul can take a fused norm/epilogue."""
    if "bias" in lin:
        return False
    return type(lin) is QLinear or (type(lin) is FusedLinear and lin.quantized)


def _plus(lin, a, r):
    """r + lin(a), with the add inside the matmul for a plain quantized linear."""
    if type(lin) is QLinear and "bias" not in lin:
        return qmm_fused(a, lin.weight, lin.scales, lin.biases, lin.bits, lin.group_size, residual=r)
    return r + lin(a)


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
    blocks = getattr(getattr(model, "model", None), "layers", [])
    for block in blocks:
        if on and compilable(block) and block.compiled is None:
            block.compiled = CompiledBlock(block, max_tokens)
            n += 1
        elif not on and block.compiled is not None:
            del block.compiled  # back to the class default (eager)
            n += 1
    if on and n:
        for b, nxt in zip(blocks, blocks[1:]):
            if b.compiled is not None and nxt.compiled is not None:
                b.compiled.link_to(nxt.compiled)
    return n
