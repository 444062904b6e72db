"""Gemma 3 (text): the generic decoder with Gemma's differences.

- RMSNorm scales by (1 + w); the stored weight is w, as in HF checkpoints.
- Four norms per block: input, post_attention (on the attention output, before the residual add),
  pre_feedforward and post_feedforward.
- q/k RMSNorm per head; attention scale query_pre_attn_scalar ** -0.5.
- Sliding-window ("sliding_attention") and global ("full_attention") layers, from `layer_types`
  or every `sliding_window_pattern`-th layer global. Sliding layers use RoPE base
  `rope_local_base_freq`; global ones `rope_theta` plus `rope_scaling`.
- Embeddings scaled by sqrt(hidden_size) in the activation dtype; GELU-tanh MLP; tied lm_head.

model_type "gemma3" (the multimodal checkpoint) is served text-only: its `text_config` is used and
the vision tower's weights are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .decoder import MLP, Attention as BaseAttention, Block as DenseBlock, DecoderArgs, DecoderModel
from .layers import RoPE


@dataclass
class ModelArgs(DecoderArgs):
    # Defaults follow transformers' Gemma3TextConfig.
    model_type: str = "gemma3_text"
    hidden_size: int = 2304
    num_hidden_layers: int = 26
    intermediate_size: int = 9216
    num_attention_heads: int = 8
    num_key_value_heads: int | None = 4
    head_dim: int | None = 256
    vocab_size: int = 262208
    rope_theta: float = 1_000_000.0
    rope_local_base_freq: float = 10_000.0
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = True
    query_pre_attn_scalar: float = 256
    sliding_window: int | None = 4096
    sliding_window_pattern: int = 6
    layer_types: list | None = None
    hidden_activation: str = "gelu_pytorch_tanh"
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    use_bidirectional_attention: bool | None = False

    @classmethod
    def from_dict(cls, cfg: dict):
        if "text_config" in cfg:  # multimodal "gemma3": the text model's config is nested
            cfg = {**(cfg.get("text_config") or {}), "model_type": "gemma3_text"}
        return super().from_dict(cfg)

    def __post_init__(self):
        rp = self.rope_parameters
        self.local_rope_scaling = None
        if isinstance(rp, dict) and "full_attention" in rp:  # transformers 5, per layer type
            full, local = rp.get("full_attention") or {}, rp.get("sliding_attention") or {}
            self.rope_theta = float(full.get("rope_theta", self.rope_theta))
            self.rope_local_base_freq = float(local.get("rope_theta", self.rope_local_base_freq))
            self.rope_scaling = full if full.get("rope_type", "default") != "default" else None
            self.local_rope_scaling = local if local.get("rope_type", "default") != "default" else None
            self.rope_parameters = None
        super().__post_init__()
        if self.attn_logit_softcapping:
            raise ValueError("gemma3: attn_logit_softcapping is not supported")
        if self.use_bidirectional_attention:
            raise ValueError("gemma3: use_bidirectional_attention is not supported (causal LM only)")
        if self.layer_types is None:
            p = self.sliding_window_pattern
            self.layer_types = ["sliding_attention" if (i + 1) % p else "full_attention"
                                for i in range(self.num_hidden_layers)]
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"gemma3: {len(self.layer_types)} layer_types for {self.num_hidden_layers} layers")

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == "sliding_attention"


class RMSNorm(nn.Module):
    """Gemma's RMSNorm: x / rms(x) * (1 + weight), computed in float32 like transformers (1 + w
    in bfloat16 would round the scale to 1/128)."""

    def __init__(self, dims: int, eps: float = 1e-6):
        super().__init__()
        self.weight = mx.zeros((dims,))
        self.eps = eps

    def __call__(self, x):
        if x.dtype == mx.float32:
            return mx.fast.rms_norm(x, 1.0 + self.weight.astype(mx.float32), self.eps)
        return mx.fast.rms_norm(x.astype(mx.float32), 1.0 + self.weight.astype(mx.float32), self.eps).astype(x.dtype)


class Attention(BaseAttention):
    def __init__(self, args: ModelArgs, layer: int, window):
        super().__init__(args, layer, window)
        self.scale = float(args.query_pre_attn_scalar) ** -0.5
        if args.attention_bias:
            self.o_proj = nn.Linear(self.n_heads * self.hd, args.hidden_size, bias=True)
        self.q_norm = RMSNorm(self.hd, eps=args.rms_norm_eps)
        self.k_norm = RMSNorm(self.hd, eps=args.rms_norm_eps)
        if args.is_sliding(layer):
            self.rope = RoPE(self.hd, args.rope_local_base_freq, False, args.local_rope_scaling,
                             args.max_position_embeddings)
        else:
            self.rope = RoPE(self.hd, args.rope_theta, False, args.rope_scaling, args.max_position_embeddings)


class Block(DenseBlock):
    attention_class = Attention

    def __init__(self, args: ModelArgs, layer: int, window):
        super().__init__(args, layer, window)
        d, eps = args.hidden_size, args.rms_norm_eps
        self.input_layernorm = RMSNorm(d, eps)
        self.post_attention_layernorm = RMSNorm(d, eps)
        self.pre_feedforward_layernorm = RMSNorm(d, eps)
        self.post_feedforward_layernorm = RMSNorm(d, eps)

    def make_mlp(self, args: ModelArgs, layer: int):
        return MLP(args.hidden_size, args.intermediate_size, False, args.hidden_activation)

    def __call__(self, x, positions, attn):
        h = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), positions, attn))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class Model(DecoderModel):
    block_class = Block

    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self.model.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    @staticmethod
    def _windows(args: ModelArgs) -> list[int | None]:
        return [args.sliding_window if args.is_sliding(i) else None for i in range(args.num_hidden_layers)]

    def embed(self, tokens):
        h = self.model.embed_tokens(tokens)
        return h * mx.array(self.args.hidden_size**0.5, dtype=h.dtype)

    def head(self, h):
        logits = super().head(h)
        cap = self.args.final_logit_softcapping
        if cap:
            logits = mx.tanh(logits / cap) * cap
        return logits

    def sanitize(self, weights: dict) -> dict:
        out = {}
        for k, v in weights.items():
            # Multimodal checkpoints: keep the language model, drop vision tower and projector.
            if k.startswith("language_model.model."):
                k = "model." + k[len("language_model.model."):]
            elif k.startswith("model.language_model."):
                k = "model." + k[len("model.language_model."):]
            elif k.startswith("language_model.lm_head."):
                k = k[len("language_model."):]
            if "vision_tower" in k or "multi_modal_projector" in k:
                continue
            out[k] = v
        return super().sanitize(out)
