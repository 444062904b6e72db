"""Per-model sampling defaults: what a request gets for temperature / top_p / top_k / min_p /
repetition_penalty when it leaves them out.

Like vLLM, the model's own recommendation wins over the API's: `generation_config.json` in a model
folder, or the `general.sampling.*` keys of a .gguf file. Anything the model does not set falls back
to OpenAI's defaults (temperature 1, top_p 1, no top_k / min_p / repetition penalty). `do_sample` is
ignored (vLLM does the same): a request that wants greedy output sends temperature 0.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

log = logging.getLogger("jang_serve.server")

OPENAI_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}

# general.sampling.* key in a GGUF -> our name
_GGUF_KEYS = {"temp": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
              "penalty_repeat": "repetition_penalty"}


def _valid(name: str, v) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return False
    return {"temperature": v >= 0, "top_p": 0 < v <= 1, "top_k": v >= 0 and float(v).is_integer(),
            "min_p": 0 <= v <= 1, "repetition_penalty": v > 0}[name]


def _clean(found: dict, where: str) -> dict:
    out = {}
    for k, v in found.items():
        if k not in OPENAI_DEFAULTS:
            continue
        if _valid(k, v):
            out[k] = int(v) if k == "top_k" else float(v)
        else:
            log.warning("%s: ignoring %s=%r (not a valid value)", where, k, v)
    return out


def _from_gguf(path: Path) -> dict:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    found = {}
    for key, name in _GGUF_KEYS.items():
        field = reader.fields.get(f"general.sampling.{key}")
        if field is not None and field.data:
            found[name] = field.parts[field.data[0]].tolist()[0]
    return found


def model_recommendation(path: str | Path) -> tuple[dict, str | None]:
    """The sampling values a model recommends, and where they came from (None: it recommends none)."""
    path = Path(path)
    try:
        if path.is_dir():
            gen = path / "generation_config.json"
            if gen.is_file():
                data = json.loads(gen.read_text())
                if isinstance(data, dict):
                    vals = _clean(data, str(gen))
                    return (vals, "generation_config.json") if vals else ({}, None)
        elif path.suffix == ".gguf" and path.is_file():
            vals = _clean(_from_gguf(path), str(path))
            return (vals, "gguf general.sampling") if vals else ({}, None)
    except (OSError, ValueError) as e:  # unreadable: serve with the API's defaults, say why
        log.warning("could not read sampling defaults from %s: %s", path, e)
    return {}, None


def sampling_defaults(path: str | Path) -> dict:
    """The card of a model's defaults: `values` (its recommendation over OpenAI's), `source` (the file
    the recommendation came from, or "openai") and `from_model` (the keys the model set)."""
    rec, source = model_recommendation(path)
    return {"values": {**OPENAI_DEFAULTS, **rec}, "source": source or "openai", "from_model": sorted(rec)}
