"""GGUF import: a llama.cpp model file -> HF-style config, float32 weights under HF names,
tokenizer and chat template.

    read_gguf(path) -> GGUFModel(config, weights, tokenizer, chat_template)
    load_gguf_model(path, dtype=mx.float32) -> (model, config, tokenizer)

Every quant type is dequantized by `gguf.quants`. llama.cpp changes some tensors on the way in,
which we undo: the q/k rows of Llama-family models are permuted (for its rotate-half RoPE), and
Gemma's norm weights are stored with the +1 already added.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from .gguf_config import config_from_metadata, permuted_arch
from .gguf_file import GGUFFile, GGUFFormatError
from .gguf_names import hf_name
from .gguf_tokenizer import tokenizer_from_gguf


# A GGUF file we cannot import; the message names the file and the problem. (A ValueError:
# engine.loader.load_model turns it into its LoadError.)
GGUFError = GGUFFormatError


@dataclass
class GGUFModel:
    config: dict
    weights: dict[str, mx.array]
    tokenizer: object  # engine.tokenizer.Tokenizer
    chat_template: str | None
    metadata: dict = field(default_factory=dict)  # scalar metadata (arrays left out)
    quant_types: dict[str, str] = field(default_factory=dict)  # HF name -> ggml type it was stored in


def read_gguf(path: str | Path, with_weights: bool = True) -> GGUFModel:
    path = Path(path)
    f = GGUFFile(path)
    fields = f.fields
    arch = fields.get("general.architecture")
    if not arch:
        raise GGUFError(f"{path}: no general.architecture in the metadata")
    config = config_from_metadata(f, str(path))
    template = fields.get("tokenizer.chat_template")
    tokenizer = _tokenizer(path, fields, template)
    config.setdefault("bos_token_id", tokenizer.bos_token_id)
    config.setdefault("eos_token_id", sorted(tokenizer.eos_token_ids) if tokenizer.eos_token_ids else None)
    weights, qtypes = ({}, {})
    if with_weights:
        weights, qtypes = _read_weights(f, arch, config, str(path))
    meta = {k: v for k, v in fields.items() if not isinstance(v, (list, np.ndarray))}
    return GGUFModel(config, weights, tokenizer, template, meta, qtypes)


_TOKENIZERS: dict = {}


def _tokenizer(path: Path, fields: dict, template: str | None):
    """Build the tokenizer once per file (Gemma's 262k vocabulary takes seconds to turn into merges)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    tok = _TOKENIZERS.pop(key, None)
    if tok is None:
        tok = tokenizer_from_gguf(fields, chat_template=template, source=str(path))
    _TOKENIZERS[key] = tok  # most recent last; keep a few, they are large
    while len(_TOKENIZERS) > 3:
        _TOKENIZERS.pop(next(iter(_TOKENIZERS)))
    return tok


def _read_weights(f: GGUFFile, arch: str, config: dict, source: str):
    weights, qtypes = {}, {}
    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    for name, info in f.tensors.items():
        names = hf_name(arch, name, config)
        if names is None:
            raise GGUFError(f"{source}: tensor {name!r} has no known meaning for architecture {arch!r}")
        if not names:  # known but not a parameter (e.g. rope_freqs, folded into the config)
            continue
        try:
            w = f.float32(name)
        except (ValueError, NotImplementedError) as e:
            raise GGUFError(f"{source}: cannot dequantize {name} ({info.qtype.name}): {e}") from None
        if permuted_arch(arch, config):
            if name.endswith("attn_q.weight") or name.endswith("attn_q.bias"):
                w = _unpermute(w, n_head)
            elif name.endswith("attn_k.weight") or name.endswith("attn_k.bias"):
                w = _unpermute(w, n_kv)
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            w = w - 1.0  # llama.cpp stores Gemma's (1 + w) norm scale; HF stores w
        if isinstance(names, str):
            weights[names] = mx.array(w)
            qtypes[names] = info.qtype.name
        else:  # stacked experts [E, ...] -> one HF tensor per expert
            for e, n in enumerate(names):
                weights[n] = mx.array(w[e])
                qtypes[n] = info.qtype.name
    return weights, qtypes


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute`: per head, rows (pairs interleaved) -> (first half, second half)."""
    rows = w.shape[0]
    if rows % n_head or (rows // n_head) % 2:
        raise GGUFError(f"cannot undo the q/k permutation: {rows} rows for {n_head} heads")
    hd = rows // n_head
    rest = w.shape[1:]
    return w.reshape(n_head, hd // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def load_gguf_model(path: str | Path, dtype=mx.float32):
    """Build our model from a GGUF file; returns (model, config, tokenizer)."""
    from jang_serve.engine.models import build_model

    g = read_gguf(path)
    try:
        model = build_model(g.config)
    except ValueError as e:
        raise GGUFError(f"{path}: {e}") from None
    weights = model.sanitize(g.weights)
    if dtype != mx.float32:
        weights = {k: v.astype(dtype) for k, v in weights.items()}
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise GGUFError(f"{path}: weights do not fit the {g.config['model_type']} model: {e}") from None
    mx.eval(model.parameters())
    return model, g.config, g.tokenizer
