"""Phi-3 / Phi-3.5 / Phi-4-mini: the generic decoder with fused projections kept under their HF
names: `self_attn.qkv_proj` (q rows, then k, then v) and `mlp.gate_up_proj` (gate rows, then up),
so checkpoints and JANG bundles load unchanged. RoPE may cover only part of each head
(`partial_rotary_factor`). LongRoPE (`rope_type` "longrope"/"su", Phi-3-128k, Phi-3.5, Phi-4-mini)
is supported as transformers does it: a sequence whose context is longer than
`original_max_position_embeddings` uses `long_factor`, otherwise `short_factor`, and the rotated
part is scaled by the attention factor."""

import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .layers import RoPE
from .decoder import ACTIVATIONS, Attention as BaseAttention, Block as DenseBlock, DecoderArgs, DecoderModel


@dataclass
class ModelArgs(DecoderArgs):
    model_type: str = "phi3"
    rms_norm_eps: float = 1e-5
    original_max_position_embeddings: int | None = None

    def __post_init__(self):
        super().__post_init__()
        sc = self.rope_scaling or {}
        self.longrope = sc.get("rope_type", sc.get("type")) in ("longrope", "su")
        self.longrope_params = sc if self.longrope else None
        if self.longrope:
            self.rope_scaling = None  # handled by LongRoPE below, not by layers.RoPE


class LongRoPE(nn.Module):
    """LongRoPE: per-dimension frequency factors (short or long, chosen per sequence by its context
    length) and an attention factor on the rotated dims."""

    def __init__(self, dims: int, args: ModelArgs):
        super().__init__()
        sc = args.longrope_params
        if "short_factor" not in sc or "long_factor" not in sc:
            raise ValueError("phi3 longrope: rope scaling needs short_factor and long_factor")
        self.dims = dims
        self.original_max = int(sc.get("original_max_position_embeddings") or args.original_max_position_embeddings
                                or args.max_position_embeddings)
        factor = sc.get("factor") or args.max_position_embeddings / self.original_max
        af = sc.get("attention_factor")
        if af is None:
            af = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(self.original_max))
        self.attention_factor = float(af)
        periods = args.rope_theta ** (np.arange(0, dims, 2, dtype=np.float32) / dims)
        for name in ("short_factor", "long_factor"):
            f = np.asarray(sc[name], dtype=np.float32)
            if f.shape != (dims // 2,):
                raise ValueError(f"phi3 longrope: {name} has {f.size} entries, expected {dims // 2}")
        self._short = mx.array(np.asarray(sc["short_factor"], np.float32) * periods)
        self._long = mx.array(np.asarray(sc["long_factor"], np.float32) * periods)

    def __call__(self, x, positions, use_long):
        x = x.at[..., : self.dims].multiply(self.attention_factor) if self.attention_factor != 1.0 else x
        x4 = x[:, :, None, :]
        short = mx.fast.rope(x4, self.dims, traditional=False, base=None, scale=1.0, offset=positions,
                             freqs=self._short)
        if use_long is None:
            return short[:, :, 0, :]
        long = mx.fast.rope(x4, self.dims, traditional=False, base=None, scale=1.0, offset=positions,
                            freqs=self._long)
        return mx.where(use_long[:, None, None, None], long, short)[:, :, 0, :]

    def long_mask(self, attn):
        """Per token: does its sequence's context exceed original_max (None when no token does)?"""
        lay = attn.layout
        ctx = np.repeat(np.asarray(lay.context_lens), np.asarray(lay.query_lens))
        flags = ctx > self.original_max
        return mx.array(flags) if flags.any() else None


class Attention(BaseAttention):
    def __init__(self, args: ModelArgs, layer: int, window):
        nn.Module.__init__(self)
        self.layer, self.window = layer, window
        self.n_heads, self.n_kv, self.hd = args.num_attention_heads, args.num_key_value_heads, args.head_dim
        self.scale = self.hd**-0.5
        self.qkv_proj = nn.Linear(args.hidden_size, (self.n_heads + 2 * self.n_kv) * self.hd, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.hd, args.hidden_size, bias=False)
        rot = int(self.hd * args.partial_rotary_factor)
        if args.longrope:
            self.rope = LongRoPE(rot, args)
        else:
            self.rope = RoPE(rot, args.rope_theta, False, args.rope_scaling, args.max_position_embeddings)

    def project(self, x):
        qkv = self.qkv_proj(x)
        nq, nkv = self.n_heads * self.hd, self.n_kv * self.hd
        return qkv[:, :nq], qkv[:, nq:nq + nkv], qkv[:, nq + nkv:]

    def __call__(self, x, positions, attn):
        if not isinstance(self.rope, LongRoPE):
            return super().__call__(x, positions, attn)
        t = x.shape[0]
        q, k, v = self.project(x)
        q, k, v = q.reshape(t, self.n_heads, self.hd), k.reshape(t, self.n_kv, self.hd), v.reshape(t, self.n_kv, self.hd)
        use_long = self.rope.long_mask(attn)
        q, k = self.rope(q, positions, use_long), self.rope(k, positions, use_long)
        o = attn.attend(self.layer, q, k, v, scale=self.scale, window=self.window)
        return self.o_proj(o.reshape(t, -1))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.gate_up_proj = nn.Linear(dim, 2 * hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.act = ACTIVATIONS[act]

    def __call__(self, x):
        gate, up = mx.split(self.gate_up_proj(x), 2, axis=-1)
        return self.down_proj(self.act(gate) * up)


class Block(DenseBlock):
    attention_class = Attention

    def make_mlp(self, args: ModelArgs, layer: int):
        return MLP(args.hidden_size, args.intermediate_size, args.hidden_act)


class Model(DecoderModel):
    block_class = Block
