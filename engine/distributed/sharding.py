"""Tensor-parallel sharding of a loaded dense decoder, in place, for one rank of `size`.

Per block (Megatron style, one all_sum after attention and one after the MLP):
  attention  q/k/v_proj keep this rank's heads (output rows); o_proj keeps the matching input
             columns and is followed by an all_sum. KV heads are split by GQA group when there
             are at least as many KV heads as ranks; with fewer, the query heads are split and
             each rank keeps (replicates) the KV heads its query heads read.
  MLP        gate/up_proj keep a slice of the intermediate rows; down_proj the same input
             columns, then an all_sum.
  embedding  rows split by vocabulary: a lookup keeps the rows this rank holds (zeros elsewhere)
             and all_sums; the tied head (and an untied lm_head) computes this rank's vocabulary
             slice of the logits and all_gathers them.
Quantized weights (MLX affine: packed uint32 + scales/biases per group along the input) are cut
on group boundaries, so the shards are exactly the packed bytes of the full tensor; slicing a float
model first and quantizing the shards gives the same arrays (the split unit is a multiple of 128).
Splits may be uneven (SmolLM2 has 9 query / 3 KV heads): every rank's pool holds its own heads.
"""

from __future__ import annotations

import copy

import mlx.core as mx
import mlx.nn as nn

from jang_serve.engine.models.layers import QLinear
from jang_serve.kernels import qmm

from .shard_load import materialize_rest, take  # take(a, *slices): a slice that owns its memory


class ShardError(ValueError):
    """The model cannot be split over this many ranks (the message says why)."""


def _is_quant(m) -> bool:
    return "scales" in m and hasattr(m, "bits")


def split_range(n: int, size: int, rank: int, unit: int = 1) -> tuple[int, int]:
    """[start, end) of rank's share of n items, cut on multiples of `unit` (as even as possible)."""
    if n % unit:
        raise ShardError(f"{n} is not a multiple of the split unit {unit}")
    groups = n // unit
    if groups < size:
        raise ShardError(f"cannot split {n} over {size} ranks in units of {unit}")
    return rank * groups // size * unit, (rank + 1) * groups // size * unit


def head_split(n_heads: int, n_kv: int, size: int, rank: int) -> tuple[int, int, int, int]:
    """(q0, q1, k0, k1): this rank's query heads [q0, q1) and KV heads [k0, k1)."""
    if n_heads % n_kv:
        raise ShardError(f"{n_heads} query heads are not a multiple of {n_kv} KV heads")
    g = n_heads // n_kv
    if n_kv >= size:
        k0, k1 = split_range(n_kv, size, rank)
        return k0 * g, k1 * g, k0, k1
    q0, q1 = split_range(n_heads, size, rank)
    k0, k1 = q0 // g, (q1 - 1) // g + 1
    nq, nk = q1 - q0, k1 - k0
    # The attention maps local query head i to local KV head i // (nq / nk): check that holds.
    if nq % nk or any((q0 + i) // g - k0 != i // (nq // nk) for i in range(nq)):
        raise ShardError(f"cannot split {n_heads} query heads / {n_kv} KV heads over {size} ranks "
                         f"(rank {rank} would hold query heads {q0}..{q1 - 1} over uneven KV heads)")
    return q0, q1, k0, k1


# -- slicing one linear --------------------------------------------------------------------------
def slice_rows(lin, r0: int, r1: int):
    """The output features [r0, r1) of a Linear / QLinear (quantized rows are independent)."""
    bias = "bias" in lin
    if _is_quant(lin):
        q = QLinear(lin.weight.shape[1] * 32 // lin.bits, r1 - r0, bias, lin.bits, lin.group_size)
        q.weight, q.scales, q.biases = (take(getattr(lin, n), slice(r0, r1)) for n in ("weight", "scales", "biases"))
        out = q
    else:
        out = nn.Linear(lin.weight.shape[1], r1 - r0, bias=bias)
        out.weight = take(lin.weight, slice(r0, r1))
    if bias:
        out.bias = take(lin.bias, slice(r0, r1))
    return out


def slice_cols(lin, c0: int, c1: int):
    """The input features [c0, c1) of a Linear / QLinear, without its bias (added after the sum).
    Quantized: c0 and c1 must fall on group boundaries; then whole packed words are kept."""
    if _is_quant(lin):
        gs, bits = lin.group_size, lin.bits
        if c0 % gs or c1 % gs:
            raise ShardError(f"input columns {c0}..{c1} do not fall on the quantization groups of {gs}")
        q = QLinear(c1 - c0, lin.weight.shape[0], False, bits, gs)
        q.weight = take(lin.weight, slice(None), slice(c0 * bits // 32, c1 * bits // 32))
        q.scales, q.biases = (take(getattr(lin, n), slice(None), slice(c0 // gs, c1 // gs))
                              for n in ("scales", "biases"))
        return q
    out = nn.Linear(c1 - c0, lin.weight.shape[0], bias=False)
    out.weight = take(lin.weight, slice(None), slice(c0, c1))
    return out


def _in_features(lin) -> int:
    return lin.weight.shape[1] * 32 // lin.bits if _is_quant(lin) else lin.weight.shape[1]


def _unit(lin, n: int, size: int) -> int:
    """Split unit along a linear's input: its quantization group, else the largest of 128/64/32/8
    that divides n into at least `size` parts (so sharding before or after quantizing agree)."""
    if _is_quant(lin):
        return lin.group_size
    return next(u for u in (128, 64, 32, 8, 1) if n % u == 0 and n // u >= size)


# -- sharded modules ---------------------------------------------------------------------------
class _AllSum:
    """A linear over this rank's input columns: the partial products are summed over the group, then
    the bias (`sum_bias`) is added once. The local weight keeps the usual names (weight, scales,
    biases, bits, group_size), so code that reads projection weights (engine/kv_transform.py) sees
    this rank's columns."""

    def __call__(self, x):
        if "scales" in self:
            y = qmm(x, self.weight, self.scales, self.biases, self.bits, self.group_size)
        else:
            y = x @ self.weight.T
        y = mx.distributed.all_sum(y, group=self.group)
        return y + self.sum_bias if "sum_bias" in self else y


class AllSumLinear(_AllSum, nn.Linear):
    pass


class AllSumQLinear(_AllSum, QLinear):
    def dense_twin(self, weight):
        out = AllSumLinear(self.input_dims, self.output_dims, bias=False)
        out.weight, out.group = weight, self.group
        if "sum_bias" in self:
            out.sum_bias = self.sum_bias.astype(weight.dtype)
        return out


def all_sum_linear(local, bias, group):
    """Wrap a column-sliced Linear / QLinear (no bias of its own) into its all-summing twin."""
    if isinstance(local, QLinear):
        out = AllSumQLinear(local.input_dims, local.output_dims, False, local.bits, local.group_size)
        out.weight, out.scales, out.biases = local.weight, local.scales, local.biases
    else:
        out = AllSumLinear(local.weight.shape[1], local.weight.shape[0], bias=False)
        out.weight = local.weight
    if bias is not None:
        out.sum_bias = bias
    out.group = group
    return out


def _gather_vocab(y, vocab: int, group):
    """[T, V/size] on each rank -> [T, V] on every rank (ranks hold consecutive vocabulary slices)."""
    t, per = y.shape
    g = mx.distributed.all_gather(y[None], group=group)  # [size, T, per]
    return g.transpose(1, 0, 2).reshape(t, -1)[:, :vocab]


def _pad_rows(a, rows: int):
    return a if a.shape[0] == rows else mx.concatenate([a, mx.zeros((rows - a.shape[0], *a.shape[1:]), a.dtype)])


class VocabShardedEmbedding(nn.Module):
    """An embedding holding the vocabulary rows [v0, v0 + per) (zero-padded to `per`) in `local`,
    a plain nn.Embedding / nn.QuantizedEmbedding (so quantize_model can still quantize a shard)."""

    def __init__(self, emb, rank: int, size: int, group):
        super().__init__()
        vocab, dims = emb.weight.shape[0], emb.weight.shape[1]
        per = -(-vocab // size)
        v0, v1 = min(rank * per, vocab), min((rank + 1) * per, vocab)
        self.vocab, self.v0, self.n_local, self.group = vocab, v0, v1 - v0, group
        if _is_quant(emb):
            local = nn.QuantizedEmbedding(per, dims * 32 // emb.bits, emb.group_size, emb.bits)
            local.weight, local.scales, local.biases = (_pad_rows(take(getattr(emb, n), slice(v0, v1)), per)
                                                        for n in ("weight", "scales", "biases"))
            local.freeze()
        else:
            local = nn.Embedding(per, dims)
            local.weight = _pad_rows(take(emb.weight, slice(v0, v1)), per)
        self.local = local

    def __call__(self, tokens):
        ids = tokens - self.v0
        inside = (ids >= 0) & (ids < self.n_local)
        h = self.local(mx.where(inside, ids, 0))
        h = mx.where(inside[..., None], h, mx.zeros((), h.dtype))
        return mx.distributed.all_sum(h, group=self.group)

    def as_linear(self, x):
        """The tied head: logits of this rank's vocabulary slice, gathered to the full vocabulary."""
        e = self.local
        if isinstance(e, nn.QuantizedEmbedding):
            y = qmm(x, e.weight, e.scales, e.biases, e.bits, e.group_size)
        else:
            y = e.as_linear(x)
        return _gather_vocab(y, self.vocab, self.group)


class VocabShardedHead(nn.Module):
    """An untied lm_head over this rank's vocabulary rows, gathered to the full vocabulary."""

    def __init__(self, lin, rank: int, size: int, group):
        super().__init__()
        vocab = lin.weight.shape[0]
        per = -(-vocab // size)
        v0, v1 = min(rank * per, vocab), min((rank + 1) * per, vocab)
        self.vocab, self.group = vocab, group
        local = slice_rows(lin, v0, v1)
        for name in ("weight", "scales", "biases", "bias"):
            if name in local:
                setattr(local, name, _pad_rows(getattr(local, name), per))
        self.local = local

    def __call__(self, x):
        return _gather_vocab(self.local(x), self.vocab, self.group)


# -- the whole model -----------------------------------------------------------------------------
def take_rows(lin, ranges: list[tuple[int, int]]):
    """Several output-row ranges of one linear, concatenated (fused qkv_proj / gate_up_proj)."""
    parts = [slice_rows(lin, a, b) for a, b in ranges]
    out = parts[0]
    for name in ("weight", "scales", "biases", "bias"):
        if name in out:
            setattr(out, name, mx.concatenate([getattr(p, name) for p in parts]))
    if isinstance(out, QLinear):
        out.output_dims = out.weight.shape[0]
    return out


def _shard_attention(a, group, hd: int, heads: tuple[int, int, int, int], n_heads: int, n_kv: int) -> None:
    q0, q1, k0, k1 = heads
    if "qkv_proj" in a:  # phi3: rows are all q heads, then k heads, then v heads
        kq, kv = n_heads * hd, (n_heads + n_kv) * hd
        a.qkv_proj = take_rows(a.qkv_proj, [(q0 * hd, q1 * hd), (kq + k0 * hd, kq + k1 * hd),
                                            (kv + k0 * hd, kv + k1 * hd)])
    else:
        a.q_proj = slice_rows(a.q_proj, q0 * hd, q1 * hd)
        a.k_proj = slice_rows(a.k_proj, k0 * hd, k1 * hd)
        a.v_proj = slice_rows(a.v_proj, k0 * hd, k1 * hd)
    bias = a.o_proj.bias if "bias" in a.o_proj else None
    a.o_proj = all_sum_linear(slice_cols(a.o_proj, q0 * hd, q1 * hd), bias, group)
    a.n_heads, a.n_kv = q1 - q0, k1 - k0


def _shard_mlp(blk, name: str, group, rank: int, size: int) -> int:
    """Cut the block's feed-forward; returns this rank's intermediate size."""
    from .experts import shard_moe

    m = getattr(blk, name)
    if "switch_mlp" in m:  # sparse MoE: every expert cut the same way, router replicated
        wrapped, inter = shard_moe(m, group, rank, size, split_range, _unit)
        setattr(blk, name, wrapped)
        return inter
    n = _in_features(m.down_proj)
    i0, i1 = split_range(n, size, rank, _unit(m.down_proj, n, size))
    if "gate_up_proj" in m:  # phi3: gate rows, then up rows
        m.gate_up_proj = take_rows(m.gate_up_proj, [(i0, i1), (n + i0, n + i1)])
    else:
        m.gate_proj, m.up_proj = slice_rows(m.gate_proj, i0, i1), slice_rows(m.up_proj, i0, i1)
    bias = m.down_proj.bias if "bias" in m.down_proj else None
    m.down_proj = all_sum_linear(slice_cols(m.down_proj, i0, i1), bias, group)
    return i1 - i0


def _check_supported(model) -> None:
    layers = getattr(getattr(model, "model", None), "layers", None) or []
    if not layers or "embed_tokens" not in model.model:
        raise ShardError("the model has no decoder layers (model.layers) and embed_tokens to shard")
    for i, blk in enumerate(layers):
        attn, mlp = getattr(blk, "self_attn", None), getattr(blk, getattr(blk, "mlp_name", "mlp"), None)
        if attn is None or "o_proj" not in attn or not (
                "qkv_proj" in attn or all(n in attn for n in ("q_proj", "k_proj", "v_proj"))):
            raise ShardError(f"layer {i}: tensor parallelism needs q/k/v (or fused qkv) and o projections "
                             f"({type(model).__module__} is not supported)")
        dense = mlp is not None and "down_proj" in mlp and ("gate_up_proj" in mlp or (
            "gate_proj" in mlp and "up_proj" in mlp))
        if not dense and not (mlp is not None and "switch_mlp" in mlp):
            raise ShardError(f"layer {i}: tensor parallelism needs a gated MLP (gate/up/down) or a "
                             f"sparse MoE (switch_mlp); model {type(model).__module__}")


def shard_model(model, group, rank: int | None = None, size: int | None = None) -> dict:
    """Cut `model` in place down to `rank`'s shard (rank/size default to the group's). Returns a
    summary {heads, kv_heads, intermediate (of the first layer), vocab_rows} of what this rank holds."""
    rank = group.rank() if rank is None else rank
    size = group.size() if size is None else size
    if not 0 <= rank < size:
        raise ShardError(f"rank {rank} is not one of the {size} ranks 0..{size - 1}")
    _check_supported(model)
    args = copy.copy(model.args)
    hd = args.head_dim
    heads = head_split(args.num_attention_heads, args.num_key_value_heads, size, rank)
    inter = []
    for blk in model.model.layers:
        _shard_attention(blk.self_attn, group, hd, heads, args.num_attention_heads, args.num_key_value_heads)
        inter.append(_shard_mlp(blk, getattr(blk, "mlp_name", "mlp"), group, rank, size))
    inner = model.model
    emb = VocabShardedEmbedding(inner.embed_tokens, rank, size, group)
    inner.embed_tokens = emb
    if "lm_head" in model:
        model.lm_head = VocabShardedHead(model.lm_head, rank, size, group)
    q0, q1, k0, k1 = heads
    args.num_attention_heads, args.num_key_value_heads = q1 - q0, k1 - k0
    model.args = args
    materialize_rest(model)  # shard-aware load: read what was not cut (norms, biases summed after)
    mx.eval(model.parameters())
    return {"rank": rank, "size": size, "heads": [q0, q1], "kv_heads": [k0, k1], "intermediate": inter[0],
            "vocab_rows": [emb.v0, emb.v0 + emb.n_local]}
