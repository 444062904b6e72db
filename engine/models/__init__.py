"""Model families, registered by Hugging Face `model_type`.

Each family module defines a `ModelArgs` dataclass (built from config.json) and a `Model`
(nn.Module) with this interface:

    Model(args)
    model(tokens [T] int32, positions [T] int32, attn: AttentionBackend, logits_rows=None) -> logits
        logits_rows: optional int32 indices into the T tokens; only those rows go through lm_head
        (prefill needs just each sequence's last token). None -> logits for all T tokens.
    model.sanitize(weights: dict) -> dict     HF checkpoint names/quirks -> our parameter names
    model.kv_heads, model.head_dim, model.num_layers, model.layer_windows (list[int|None], per layer)
"""

from __future__ import annotations

import importlib

_REGISTRY: dict[str, str] = {
    # model_type -> module under engine.models
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma3_text": "gemma3",
    "gemma3": "gemma3",
    "phi3": "phi3",
    "qwen3_moe": "qwen3_moe",
    "mixtral": "mixtral",
}


class UnknownModelType(ValueError):
    pass


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def get_family(model_type: str):
    """The family module (with ModelArgs and Model) for a config's model_type."""
    name = _REGISTRY.get(model_type)
    if name is None:
        raise UnknownModelType(
            f"unknown model_type {model_type!r}; supported: {', '.join(supported_model_types())}"
        )
    return importlib.import_module(f"{__name__}.{name}")


def build_model(config: dict):
    """Instantiate the float model for an HF-style config dict."""
    fam = get_family(config.get("model_type", ""))
    return fam.Model(fam.ModelArgs.from_dict(config))
