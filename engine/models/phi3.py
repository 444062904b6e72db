"""Phi-3 / Phi-3.5 / Phi-4-mini: the generic decoder with fused projections kept under their HF
names: `self_attn.qkv_proj` (q rows, then k, then v) and `mlp.gate_up_proj` (gate rows, then up),
so checkpoints and JANG bundles load unchanged. RoPE may cover only part of each head
(`partial_rotary_factor`)."""

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .layers import RoPE
from .decoder import ACTIVATIONS, Attention as BaseAttention, Block as DenseBlock, DecoderArgs, DecoderModel


@dataclass
class ModelArgs(DecoderArgs):
    model_type: str = "phi3"
    rms_norm_eps: float = 1e-5
    original_max_position_embeddings: int | None = None

    def __post_init__(self):
        super().__post_init__()
        kind = (self.rope_scaling or {}).get("rope_type", (self.rope_scaling or {}).get("type"))
        if kind in ("longrope", "su"):
            raise ValueError("phi3: rope type 'longrope' is not supported yet")


class Attention(BaseAttention):
    def __init__(self, args: ModelArgs, layer: int, window):
        nn.Module.__init__(self)
        self.layer, self.window = layer, window
        self.n_heads, self.n_kv, self.hd = args.num_attention_heads, args.num_key_value_heads, args.head_dim
        self.scale = self.hd**-0.5
        self.qkv_proj = nn.Linear(args.hidden_size, (self.n_heads + 2 * self.n_kv) * self.hd, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.hd, args.hidden_size, bias=False)
        self.rope = RoPE(int(self.hd * args.partial_rotary_factor), args.rope_theta, False, args.rope_scaling,
                         args.max_position_embeddings)

    def project(self, x):
        qkv = self.qkv_proj(x)
        nq, nkv = self.n_heads * self.hd, self.n_kv * self.hd
        return qkv[:, :nq], qkv[:, nq:nq + nkv], qkv[:, nq + nkv:]


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
