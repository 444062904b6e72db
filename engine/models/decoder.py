"""The generic dense decoder: Llama, Mistral, Qwen2 and Qwen3 are this one model with config flags.

    attention_bias      q/k/v projections carry a bias (Qwen2)
    qk_norm             RMSNorm on each head of q and k before RoPE (Qwen3)
    sliding_window      every layer attends to the last `sliding_window` tokens (Mistral)
    head_dim            explicit head size (Qwen3, some Mistral) instead of hidden / heads
    partial_rotary_factor  RoPE on the first part of each head only (Phi-3.5/Phi-4-mini)

transformers 5 writes `rope_parameters` ({"rope_theta", "rope_type", ...}) instead of the older
top-level `rope_theta` / `rope_scaling`; both spellings are read.

Families that differ only in a piece subclass the parts: `Block.attention_class`,
`Block.make_mlp()`, `DecoderModel.block_class`, `Attention.project()` (see phi3, qwen3_moe, mixtral).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from jang_serve.kernels import qmm

from .base import BaseArgs
from .layers import RoPE


@dataclass
class DecoderArgs(BaseArgs):
    model_type: str = "llama"
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    intermediate_size: int = 11008
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    vocab_size: int = 32000
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rope_traditional: bool = False
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    use_sliding_window: bool = True
    hidden_act: str = "silu"
    rope_parameters: dict | None = None
    partial_rotary_factor: float = 1.0

    def __post_init__(self):
        rp = self.rope_parameters
        if isinstance(rp, dict) and "rope_theta" in rp:  # transformers 5 layout (flat)
            self.rope_theta = float(rp["rope_theta"])
            self.partial_rotary_factor = float(rp.get("partial_rotary_factor", self.partial_rotary_factor))
            if rp.get("rope_type", "default") != "default":
                self.rope_scaling = rp
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads


class Attention(nn.Module):
    FUSE = {"qkv_fused": ("q_proj", "k_proj", "v_proj")}  # layers.fuse_projections (GPU engines)

    def __init__(self, args: DecoderArgs, layer: int, window: int | None):
        super().__init__()
        self.layer, self.window = layer, window
        self.n_heads, self.n_kv, self.hd = args.num_attention_heads, args.num_key_value_heads, args.head_dim
        self.scale = self.hd**-0.5
        b = args.attention_bias
        self.q_proj = nn.Linear(args.hidden_size, self.n_heads * self.hd, bias=b)
        self.k_proj = nn.Linear(args.hidden_size, self.n_kv * self.hd, bias=b)
        self.v_proj = nn.Linear(args.hidden_size, self.n_kv * self.hd, bias=b)
        self.o_proj = nn.Linear(self.n_heads * self.hd, args.hidden_size, bias=False)
        if args.qk_norm:
            self.q_norm = nn.RMSNorm(self.hd, eps=args.rms_norm_eps)
            self.k_norm = nn.RMSNorm(self.hd, eps=args.rms_norm_eps)
        rot = int(self.hd * args.partial_rotary_factor)
        self.rope = RoPE(rot, args.rope_theta, args.rope_traditional, args.rope_scaling,
                         args.max_position_embeddings)

    def project(self, x):
        """q, k, v as [T, heads * head_dim] rows (phi3 overrides this for its fused qkv_proj)."""
        if "qkv_fused" in self:
            return self.qkv_fused(x)
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def qkv(self, x, positions):
        """Queries, keys and values [T, heads, head_dim], normed and rotated, ready to attend."""
        t = x.shape[0]
        if t == 1 and self.joint_rope_ok():
            return self.split_rotate(self.qkv_fused.joint(x), positions)
        q, k, v = self.project(x)
        q = q.reshape(t, self.n_heads, self.hd)
        k = k.reshape(t, self.n_kv, self.hd)
        v = v.reshape(t, self.n_kv, self.hd)
        if "q_norm" in self:
            q, k = self.q_norm(q), self.k_norm(k)
        return self.rope(q, positions), self.rope(k, positions), v

    def joint_rope_ok(self) -> bool:
        """Fused q/k/v and no q/k norm: q and k can be rotated straight from the joint projection."""
        return "qkv_fused" in self and "q_norm" not in self

    def split_rotate(self, y, positions):
        """q, k, v from the joint projection y [T, (heads + 2 kv heads) * head_dim], with q and k heads
        rotated in one RoPE call (one kernel less per layer than two)."""
        y = y.reshape(y.shape[0], self.n_heads + 2 * self.n_kv, self.hd)
        qk = self.rope(y[:, :self.n_heads + self.n_kv], positions)
        return qk[:, :self.n_heads], qk[:, self.n_heads:], y[:, self.n_heads + self.n_kv:]

    def __call__(self, x, positions, attn):
        q, k, v = self.qkv(x, positions)
        o = attn.attend(self.layer, q, k, v, scale=self.scale, window=self.window)
        return self.o_proj(o.reshape(x.shape[0], -1))


class MLP(nn.Module):
    FUSE = {"gate_up_fused": ("gate_proj", "up_proj")}

    def __init__(self, dim: int, hidden: int, bias: bool = False, act: str = "silu"):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)
        self.act = ACTIVATIONS[act]

    def hidden(self, x):
        """act(gate(x)) * up(x): the input of down_proj."""
        if "gate_up_fused" in self:
            g, u = self.gate_up_fused(x)
            return self.act(g) * u
        return self.act(self.gate_proj(x)) * self.up_proj(x)

    def __call__(self, x):
        return self.down_proj(self.hidden(x))


def _gelu_tanh(x):
    return nn.gelu_approx(x)


ACTIVATIONS = {"silu": nn.silu, "gelu": nn.gelu, "gelu_pytorch_tanh": _gelu_tanh, "gelu_new": _gelu_tanh}


class Block(nn.Module):
    attention_class = Attention
    mlp_name = "mlp"  # the feed-forward's parameter prefix (Mixtral: block_sparse_moe)

    def __init__(self, args: DecoderArgs, layer: int, window: int | None):
        super().__init__()
        self.self_attn = self.attention_class(args, layer, window)
        setattr(self, self.mlp_name, self.make_mlp(args, layer))
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    compiled = None  # set by models/compiled.py (GPU engines): the block's two halves as mx.compile'd functions

    def __call__(self, x, positions, attn):
        if self.compiled is not None and self.compiled.takes(x, attn):
            return self.compiled(x, positions, attn)
        h = x + self.self_attn(self.input_layernorm(x), positions, attn)
        return h + getattr(self, self.mlp_name)(self.post_attention_layernorm(h))

    def make_mlp(self, args: DecoderArgs, layer: int) -> nn.Module:
        return MLP(args.hidden_size, args.intermediate_size, args.mlp_bias, args.hidden_act)


class Inner(nn.Module):
    def __init__(self, args: DecoderArgs, windows: list[int | None], block_class=Block):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [block_class(args, i, w) for i, w in enumerate(windows)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)


class DecoderModel(nn.Module):
    """Top-level model; HF parameter names (model.layers.N..., lm_head)."""

    block_class = Block

    def __init__(self, args: DecoderArgs):
        super().__init__()
        self.args = args
        self.layer_windows = self._windows(args)
        self.model = Inner(args, self.layer_windows, self.block_class)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    @staticmethod
    def _windows(args: DecoderArgs) -> list[int | None]:
        w = args.sliding_window if (args.sliding_window and args.use_sliding_window) else None
        return [w] * args.num_hidden_layers

    @property
    def num_layers(self) -> int:
        return self.args.num_hidden_layers

    @property
    def kv_heads(self) -> int:
        return self.args.num_key_value_heads

    @property
    def head_dim(self) -> int:
        return self.args.head_dim

    def embed(self, tokens):
        return self.model.embed_tokens(tokens)

    def head(self, h):
        if self.args.tie_word_embeddings:
            e = self.model.embed_tokens
            if isinstance(e, nn.QuantizedEmbedding):  # tied quantized head: through kernels.qmm too
                return qmm(h, e.weight, e.scales, e.biases, e.bits, e.group_size)
            return e.as_linear(h)
        return self.lm_head(h)

    def __call__(self, tokens, positions, attn, logits_rows=None):
        h = self.embed(tokens)
        out = None
        if self.model.layers and self.model.layers[0].compiled is not None:
            from .compiled import decode_chain  # (compiled.py imports this module)

            out = decode_chain(self.model.layers, h, positions, attn)
        if out is not None:  # compiled decode step: one compiled call per layer (models/compiled.py)
            h = out
        else:
            for block in self.model.layers:
                h = block(h, positions, attn)
        if logits_rows is not None:
            h = h[logits_rows]
        return self.head(self.model.norm(h))

    def sanitize(self, weights: dict) -> dict:
        weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
        if self.args.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
            for suffix in ("scales", "biases"):
                weights.pop(f"lm_head.{suffix}", None)
        return weights
