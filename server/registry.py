"""The models this server serves, by name: each one a loaded model plus its own AsyncEngine.

Models load in a background thread (so /health can answer 503 while they load); admin jobs
with `load_after` add more models at run time. Requests look models up by name here.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .config import ServerConfig
from .errors import APIError, model_not_found
from .sampling_defaults import OPENAI_DEFAULTS, sampling_defaults

log = logging.getLogger("jang_serve.server")


@dataclass
class ModelEntry:
    name: str
    source: str  # path, or a description while it is being prepared
    state: str = "loading"  # loading | ready | failed
    error: str | None = None
    engine: object = None
    tokenizer: object = None
    config: dict = field(default_factory=dict)
    context_length: int = 0
    info: dict = field(default_factory=dict)
    created: int = field(default_factory=lambda: int(time.time()))
    active: int = 0  # requests in flight (running + waiting)
    startup: bool = False  # loaded at server start (its failure stops the CLI)
    # defaults for sampling fields a request leaves out (sampling_defaults.sampling_defaults)
    sampling: dict = field(default_factory=lambda: {"values": dict(OPENAI_DEFAULTS), "source": "openai",
                                                    "from_model": []})


def model_name_for(path: str | Path) -> str:
    p = Path(str(path).rstrip("/"))
    return p.stem if p.suffix == ".gguf" else p.name


def context_length_of(config: dict, cfg: ServerConfig) -> int:
    n = None
    for key in ("max_position_embeddings", "max_seq_len", "n_positions", "seq_length", "context_length"):
        if isinstance(config.get(key), int):
            n = config[key]
            break
    n = n or 4096
    if cfg.max_model_len:
        n = min(n, cfg.max_model_len)
    return n


class ModelRegistry:
    def __init__(self, cfg: ServerConfig):
        self.cfg = cfg
        self._models: dict[str, ModelEntry] = {}
        self._lock = threading.Lock()
        self.on_failure: Callable[[ModelEntry], None] | None = None

    # ------------------------------------------------------------ adding

    def add(self, name: str, prepare: Callable[[], str | Path], source: str = "", startup: bool = False) -> ModelEntry:
        """Start loading a model in the background; `prepare()` returns its path (it may convert first)."""
        with self._lock:
            old = self._models.get(name)
            if old is not None and old.state != "failed":
                raise APIError(409, f"a model named {name!r} is already served", param="model", code="model_exists")
            entry = ModelEntry(name=name, source=source, startup=startup)
            self._models[name] = entry
        threading.Thread(target=self._load, args=(entry, prepare), daemon=True, name=f"load-{name}").start()
        return entry

    def add_path(self, path: str | Path, name: str | None = None, startup: bool = False) -> ModelEntry:
        return self.add(name or model_name_for(path), lambda: path, source=str(path), startup=startup)

    def _load(self, entry: ModelEntry, prepare: Callable[[], str | Path]) -> None:
        t0 = time.perf_counter()
        try:
            path = Path(prepare())
            entry.source = str(path)
            from jang_serve.engine.loader import load_model

            tp = self.cfg.tp if entry.startup else 1  # one tensor-parallel group per process
            # tensor parallel: rank 0 reads only its own shard (the other ranks read theirs)
            loaded = load_model(str(path), dtype=self.cfg.dtype, shard=(0, tp) if tp > 1 else None)
            entry.tokenizer = loaded.tokenizer
            entry.config = dict(loaded.config)
            entry.context_length = context_length_of(entry.config, self.cfg)
            entry.sampling = sampling_defaults(path)
            entry.info = {"format": getattr(loaded, "format", None), "quantization": _quant_summary(loaded.quantization)}
            entry.engine = _start_engine(loaded, self.cfg, entry.context_length, tp=tp)
            entry.context_length = int(getattr(entry.engine, "max_model_len", entry.context_length))
            dense = getattr(getattr(entry.engine, "core", None), "dense", None)
            if dense:  # CPU: the quantized layers run from dense copies (engine/models/dense.py)
                entry.info["quantization"] = {**(entry.info["quantization"] or {}), "cpu_dense": dense}
            entry.tokenizer = getattr(entry.engine, "tokenizer", None) or entry.tokenizer
            from . import warmup

            if warmup.wanted():  # GPU: compile the kernels before /health says ready
                vocab = entry.config.get("vocab_size") or getattr(entry.tokenizer, "vocab_size", None) or 2
                try:
                    entry.info["warmup"] = warmup.warm_up(entry.engine, self.cfg.max_num_seqs, vocab)
                except Exception as e:  # an engine that cannot generate its warm-up is not ready
                    raise RuntimeError(f"warm-up generation failed: {type(e).__name__}: {e}") from e
            entry.state = "ready"
            if hasattr(entry.engine, "on_fatal"):  # tensor parallel: a dead rank fails the model
                entry.engine.on_fatal = lambda msg, e=entry: _mark_failed(e, msg)
            log.info("model %s ready in %.1f s (%s)", entry.name, time.perf_counter() - t0, path)
        except Exception as e:
            entry.state, entry.error = "failed", f"{type(e).__name__}: {e}"
            log.error("loading model %s failed: %s", entry.name, entry.error)
            if self.on_failure is not None:
                self.on_failure(entry)

    # ------------------------------------------------------------ lookup

    def names(self) -> list[str]:
        with self._lock:
            return [n for n, e in self._models.items() if e.state == "ready"]

    def entries(self) -> list[ModelEntry]:
        with self._lock:
            return list(self._models.values())

    def get(self, name: str | None) -> ModelEntry:
        """The ready model called `name` (None = the only one), or the right API error."""
        with self._lock:
            models = dict(self._models)
        if name is None:
            if len(models) != 1:
                raise APIError(400, "'model' is required when more than one model is served", param="model")
            name = next(iter(models))
        entry = models.get(name)
        if entry is None:
            raise model_not_found(name, [n for n, e in models.items() if e.state == "ready"])
        if entry.state == "loading":
            raise APIError(503, f"model {name!r} is still loading; retry shortly", code="model_loading",
                           headers={"Retry-After": "5"})
        if entry.state == "failed":
            raise APIError(503, f"model {name!r} failed to load: {entry.error}", code="model_load_failed")
        return entry

    @property
    def loading(self) -> bool:
        return any(e.state == "loading" for e in self.entries())

    def engine_stats(self) -> dict[str, dict]:
        out = {}
        for e in self.entries():
            if e.state == "ready" and hasattr(e.engine, "stats"):
                try:
                    out[e.name] = dict(e.engine.stats())
                except Exception:  # a scrape must never fail because of one engine
                    log.exception("stats() of %s failed", e.name)
        return out

    def close(self) -> None:
        for e in self.entries():
            stop = getattr(e.engine, "shutdown", None) or getattr(e.engine, "close", None)
            if callable(stop):
                try:
                    stop()
                except Exception:
                    log.exception("stopping the engine of %s failed", e.name)


def _mark_failed(entry: ModelEntry, message: str) -> None:
    entry.state, entry.error = "failed", message
    log.error("model %s is out of service: %s", entry.name, message)


def engine_config(cfg: ServerConfig, context_length: int):
    """The engine's settings from the server's [engine] options (unset ones keep the engine's defaults)."""
    from jang_serve.engine.engine_config import EngineConfig

    kw = dict(block_size=cfg.block_size, kv_dtype=cfg.kv_dtype, max_num_seqs=cfg.max_num_seqs,
              max_model_len=context_length, enable_prefix_caching=cfg.prefix_caching)
    if cfg.kv_memory is not None:
        kw["kv_memory_gb"] = cfg.kv_memory
    if cfg.max_num_batched_tokens is not None:
        kw["max_num_batched_tokens"] = cfg.max_num_batched_tokens
    if cfg.max_prefill_chunk is not None:
        kw["max_prefill_chunk"] = cfg.max_prefill_chunk
    if cfg.cpu_dense_gb is not None:
        kw["cpu_dense_gb"] = cfg.cpu_dense_gb
    return EngineConfig(**kw)


def _start_engine(loaded, cfg: ServerConfig, context_length: int, tp: int = 1):
    from jang_serve.engine.async_engine import AsyncEngine

    if tp > 1:
        from jang_serve.engine.distributed import start_tp_engine

        engine = start_tp_engine(loaded, engine_config(cfg, context_length), tp)
    else:
        engine = AsyncEngine(loaded, engine_config(cfg, context_length))
    engine.start()
    return engine


def _quant_summary(q) -> dict | None:
    """Global bits / group size (and the range of per-module bits) without the per-module table."""
    if not isinstance(q, dict):
        return None
    out = {k: q[k] for k in ("format", "bits", "group_size", "profile") if isinstance(q.get(k), (str, int, float))}
    mods = q.get("modules")
    if isinstance(mods, dict):
        bits = sorted({m.get("bits") for m in mods.values() if isinstance(m, dict) and isinstance(m.get("bits"), int)})
        if bits:
            out["module_bits"] = bits
    return out
