"""GGUF metadata -> an HF-style config dict that `engine.models.build_model` accepts."""

from __future__ import annotations

import math

import numpy as np

from .gguf_file import GGUFFormatError

# general.architecture -> HF model_type (llama is refined below: mistral / mixtral)
ARCH_TO_MODEL_TYPE = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "qwen3moe": "qwen3_moe",
    "gemma3": "gemma3_text",
    "phi3": "phi3",
}


def _f32(x) -> float:
    """Metadata floats are float32: 1e-5 is stored as 9.99999974e-06. Give the shortest decimal
    that rounds to the same float32 (what the HF config said)."""
    return float(str(np.float32(x)))


def _scalar(v, what: str, source: str):
    """Some files store per-layer arrays (head_count_kv, feed_forward_length); one value is needed."""
    if isinstance(v, np.ndarray):
        vals = set(v.tolist())
        if len(vals) != 1:
            raise GGUFFormatError(f"{source}: per-layer {what} {sorted(vals)} is not supported")
        return vals.pop()
    return v


def permuted_arch(arch: str, config: dict) -> bool:
    """llama.cpp's converter permutes q/k rows for the Llama family (llama, mistral, mixtral)."""
    return arch == "llama"


def config_from_metadata(f, source: str) -> dict:
    """f: a GGUFFile (metadata, tensor directory; rope_freqs is read from it when present)."""
    fields, tensors = f.fields, f.tensors
    arch = fields.get("general.architecture")
    if arch not in ARCH_TO_MODEL_TYPE:
        raise GGUFFormatError(f"{source}: architecture {arch!r} is not supported "
                              f"(supported: {', '.join(sorted(ARCH_TO_MODEL_TYPE))})")

    def get(key, default=None, required=False):
        v = fields.get(f"{arch}.{key}")
        if v is None:
            if required:
                raise GGUFFormatError(f"{source}: metadata key {arch}.{key} is missing")
            return default
        return _scalar(v, key, source)

    hidden = int(get("embedding_length", required=True))
    heads = int(get("attention.head_count", required=True))
    emb = tensors.get("token_embd.weight")
    if emb is None:
        raise GGUFFormatError(f"{source}: tensor token_embd.weight is missing")
    head_dim = int(get("attention.key_length", 0) or hidden // heads)
    cfg = {
        "model_type": ARCH_TO_MODEL_TYPE[arch],
        "hidden_size": hidden,
        "num_hidden_layers": int(get("block_count", required=True)),
        "intermediate_size": int(get("feed_forward_length", required=True)),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "rms_norm_eps": _f32(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": _f32(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length", 4096)),
        "vocab_size": int(emb.shape[0]),
        "tie_word_embeddings": "output.weight" not in tensors,
        "hidden_act": "silu",
    }
    rope = _rope_scaling(get, cfg, f, source)
    if rope:
        cfg["rope_scaling"] = rope
    window = get("attention.sliding_window")

    if arch == "llama":
        experts = int(get("expert_count", 0) or 0)
        name = f"{fields.get('general.name', '')} {fields.get('general.basename', '')}".lower()
        if experts:
            cfg.update(model_type="mixtral", num_local_experts=experts,
                       num_experts_per_tok=int(get("expert_used_count", 2)))
        elif "mistral" in name:
            cfg["model_type"] = "mistral"
            cfg["sliding_window"] = int(window) if window else None
    elif arch == "qwen2":
        cfg["use_sliding_window"] = False
    elif arch == "qwen3moe":
        cfg.update(num_experts=int(get("expert_count", required=True)),
                   num_experts_per_tok=int(get("expert_used_count", required=True)),
                   moe_intermediate_size=int(get("expert_feed_forward_length", required=True)),
                   norm_topk_prob=bool(get("expert_weights_norm", True)))
    elif arch == "phi3":
        rot = int(get("rope.dimension_count", head_dim))
        cfg["partial_rotary_factor"] = rot / head_dim
        if window:
            cfg["sliding_window"] = int(window)
        orig = get("rope.scaling.original_context_length")
        if orig:
            cfg["original_max_position_embeddings"] = int(orig)
    elif arch == "gemma3":
        cfg.update(_gemma3(get, cfg, window))
    return cfg


def _gemma3(get, cfg: dict, window) -> dict:
    layers = cfg["num_hidden_layers"]
    # llama.cpp hard-codes these for gemma3 (they are not in the metadata): every 6th layer is
    # global; sliding layers use RoPE base 10000; the query scale is 1/sqrt(head_dim) except for
    # the 27B model (62 layers), which uses 1/sqrt(hidden / heads).
    pattern = 6
    scalar = cfg["hidden_size"] // cfg["num_attention_heads"] if layers == 62 else cfg["head_dim"]
    out = {
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_act": "gelu_pytorch_tanh",
        "sliding_window": int(window) if window else 4096,
        "sliding_window_pattern": pattern,
        "layer_types": ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)],
        "rope_local_base_freq": 10000.0,
        "query_pre_attn_scalar": scalar,
        "final_logit_softcapping": get("final_logit_softcapping"),
        "attn_logit_softcapping": get("attn_logit_softcapping"),
    }
    return out


def _rope_scaling(get, cfg, f, source) -> dict | None:
    tensors = f.tensors
    kind = get("rope.scaling.type")
    factor = get("rope.scaling.factor")
    if kind in (None, "none") and factor is None and "rope_freqs.weight" not in tensors:
        return None
    if kind == "linear" or (kind is None and factor):
        return {"rope_type": "linear", "factor": _f32(factor)}
    if kind == "yarn":
        return {"rope_type": "yarn", "factor": _f32(factor),
                "original_max_position_embeddings": int(get("rope.scaling.original_context_length", 0) or 0)}
    if "rope_freqs.weight" in tensors:
        dims = int(get("rope.dimension_count", cfg["head_dim"]))
        rs = llama3_rope_from_freqs(f.float32("rope_freqs.weight"), cfg["rope_theta"], dims)
        if rs is None:
            raise GGUFFormatError(f"{source}: rope_freqs tensor does not match Llama-3 rope scaling")
        return rs
    if kind in (None, "none"):
        return None
    raise GGUFFormatError(f"{source}: rope scaling type {kind!r} is not supported")


def llama3_rope_from_freqs(factors: np.ndarray, base: float, dims: int) -> dict | None:
    """llama.cpp folds Llama-3 rope scaling into a `rope_freqs` tensor (one divisor per frequency).
    Recover the HF `rope_scaling` dict by trying the published parameter sets; None if none fits."""
    factor = float(factors.max())
    for low, high, orig in ((1.0, 4.0, 8192), (1.0, 4.0, 4096), (1.0, 4.0, 16384), (1.0, 4.0, 32768)):
        want = []
        for i in range(0, dims, 2):
            wavelen = 2 * math.pi * base ** (i / dims)
            if wavelen < orig / high:
                want.append(1.0)
            elif wavelen > orig / low:
                want.append(factor)
            else:
                smooth = (orig / wavelen - low) / (high - low)
                want.append(1.0 / ((1 - smooth) / factor + smooth))
        if np.allclose(np.asarray(want), factors, rtol=1e-4):
            return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                    "high_freq_factor": high, "original_max_position_embeddings": orig}
    return None
