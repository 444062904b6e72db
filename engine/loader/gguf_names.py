"""llama.cpp tensor names -> Hugging Face parameter names, per architecture."""

from __future__ import annotations

import re

_TOP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "rope_freqs.weight": "",  # Llama-3 rope scaling, folded into config["rope_scaling"]
}

_BLOCK = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_qkv": "self_attn.qkv_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

# Gemma puts a norm on both sides of attention and of the MLP.
_GEMMA = {
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}

_MOE = {  # (router, {gguf stacked experts -> per-expert HF name})
    "qwen3moe": ("mlp.gate", "mlp.experts", {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj",
                                             "ffn_down_exps": "down_proj"}),
    "llama": ("block_sparse_moe.gate", "block_sparse_moe.experts", {"ffn_gate_exps": "w1", "ffn_up_exps": "w3",
                                                                    "ffn_down_exps": "w2"}),
}

_BLK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")


def hf_name(arch: str, name: str, config: dict) -> str | list[str] | None:
    """The HF name of a GGUF tensor: a string, a list (one name per expert of a stacked [E, ...]
    tensor), "" for tensors that are not parameters, or None when the name is unknown."""
    if name in _TOP:
        return _TOP[name]
    m = _BLK.match(name)
    if not m:
        if name.startswith("rope_factors_"):
            return ""
        return None
    layer, part, suffix = m.groups()
    prefix = f"model.layers.{layer}"
    if arch.startswith("gemma") and part in _GEMMA:
        return f"{prefix}.{_GEMMA[part]}.{suffix}"
    if arch == "phi3" and part == "ffn_up":
        return f"{prefix}.mlp.gate_up_proj.{suffix}"  # phi3 keeps gate and up fused
    moe = _MOE.get(arch)
    if moe and part == "ffn_gate_inp":
        return f"{prefix}.{moe[0]}.{suffix}"
    if moe and part in moe[2]:
        n = config.get("num_experts") or config.get("num_local_experts")
        return [f"{prefix}.{moe[1]}.{e}.{moe[2][part]}.{suffix}" for e in range(n)]
    if part in _BLOCK:
        return f"{prefix}.{_BLOCK[part]}.{suffix}"
    return None
