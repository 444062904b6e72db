"""Rank 0 of a tensor-parallel engine: the usual AsyncEngine over a sharded model, whose runner
broadcasts every step plan to the follower ranks before computing it.

Why rank 0 decides: the scheduler, block manager, prefix cache, sampler and grammar state stay in
one place (rank 0), so no rank can drift from another (no rank sees a request earlier, an abort
in a different step, or a different clock); the followers only replay flat batches. All ranks hold
the same number of KV blocks (the smallest any rank can afford) and the same slots are written.

A rank that dies: its control pipe breaks, the next collective fails ("[ring] connection to a peer
was lost"), and a watchdog polling the follower processes notices within half a second even when
idle. The engine then fails every open stream with EngineDeadError naming the rank, refuses new
requests, and calls `on_fatal(message)` (the server marks the model failed: /health says 503).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace

import mlx.core as mx
import numpy as np

from ..async_engine import AsyncEngine, EngineDeadError
from ..engine_core import model_dtype, unpack_loaded
from ..kv_pool import available_memory_bytes, bytes_per_token
from ..model_runner import ModelRunner
from .launch import Followers, RankFailure, default_backend, init_group
from .plan import StepPlan, send_plan
from .shard_load import attach_group
from .sharding import shard_model

log = logging.getLogger("jang_serve.engine.tp")


def local_num_blocks(model, cfg, dtype) -> int:
    """How many KV blocks this rank's pool can hold (KVPool.for_model's sizing, on local heads)."""
    if cfg.num_blocks is not None:
        return cfg.num_blocks
    per_tok = bytes_per_token(model.num_layers, model.kv_heads, model.head_dim, dtype, cfg.kv_bits,
                              cfg.kv_group_size)
    budget = cfg.kv_memory_gb * 1e9 if cfg.kv_memory_gb is not None else \
        cfg.kv_memory_fraction * available_memory_bytes()
    return int(budget // (per_tok * cfg.block_size))


def agree_num_blocks(model, cfg, dtype, group) -> int:
    """The smallest pool any rank can afford (every rank must have the same block ids)."""
    n = mx.distributed.all_min(mx.array([local_num_blocks(model, cfg, dtype)], dtype=mx.int32), group=group)
    return int(n.item())


class TPRunner(ModelRunner):
    """ModelRunner of rank 0: sends each prepared batch (and pending block copies) to the followers."""

    def __init__(self, model, pool, followers: Followers, group):
        super().__init__(model, pool)
        self.followers, self.group = followers, group
        self.step_started: float | None = None  # monotonic time of the step in flight (watchdog)
        self._copies: list[tuple[int, int]] = []
        local_copy = pool.copy_blocks

        def copy_blocks(pairs):  # forks copy a partial block on rank 0 now, on the others next step
            local_copy(pairs)
            self._copies.extend(pairs)

        pool.copy_blocks = copy_blocks

    def prepare(self, seqs, num_new):
        out = super().prepare(seqs, num_new)
        tokens, positions, slots, tables, qlens, clens, rows, _, _ = out
        plan = StepPlan(np.array(tokens).tolist(), np.array(positions).tolist(), np.array(slots).tolist(),
                        np.array(tables), list(qlens), list(clens), list(rows), self._copies)
        self.followers.wake()
        send_plan(plan, self.group)
        self._copies = []
        return out

    def run(self, seqs, num_new):
        self.step_started = time.monotonic()
        try:
            return super().run(seqs, num_new)
        except RankFailure:
            raise
        except Exception as e:  # the ranks may now be out of step: fatal. Say which rank is gone if one is.
            for _ in range(20):
                msg = self.followers.dead()
                if msg:
                    raise RankFailure(msg) from e
                time.sleep(0.05)
            raise RankFailure(f"tensor-parallel step failed: {e}") from e
        finally:
            self.step_started = None


class TPAsyncEngine(AsyncEngine):
    """AsyncEngine on rank 0 of a tensor-parallel group (build it with `start_tp_engine`)."""

    def __init__(self, loaded, config, followers: Followers, group, shard_info: dict | None = None,
                 step_timeout: float = 300.0):
        super().__init__(loaded, config)
        self.followers, self.group, self.shard_info = followers, group, shard_info or {}
        self.step_timeout = step_timeout
        self.core.runner = TPRunner(self.core.model, self.core.pool, followers, group)
        self.fatal_error: str | None = None
        self._on_fatal = None
        self._fail_lock = threading.Lock()
        self._closed = threading.Event()
        self._watch = threading.Thread(target=self._watchdog, name="jang-tp-watchdog", daemon=True)
        self._watch.start()

    @property
    def on_fatal(self):
        """callable(message) run once when a rank fails (set late: it runs at once if one already has)."""
        return self._on_fatal

    @on_fatal.setter
    def on_fatal(self, cb) -> None:
        self._on_fatal = cb
        if cb is not None and self.fatal_error is not None:
            cb(self.fatal_error)

    def _watchdog(self) -> None:
        while not self._closed.wait(0.5):
            msg = self.followers.dead()
            started = self.core.runner.step_started
            if msg is None and started is not None and time.monotonic() - started > self.step_timeout:
                msg = (f"a tensor-parallel step has not finished within {self.step_timeout:.0f} s "
                       f"(a rank is stuck); restart the server")
            if msg:
                self.fail(msg)
                return

    def fail(self, message: str) -> None:
        """Enter the error state: every open stream gets EngineDeadError, new requests are refused."""
        with self._fail_lock:
            if self.fatal_error is not None:
                return
            self.fatal_error = message
        log.error("%s", message)
        with self._lock:
            rids = list(self._streams)
        for rid in rids:
            self._emit(EngineDeadError(message), rid)
        self.abort_all()
        cb = self._on_fatal
        if cb is not None:
            try:
                cb(message)
            except Exception:
                log.exception("on_fatal callback failed")

    def abort_all(self) -> None:
        with self._lock:
            rids = list(self._streams)
        for rid in rids:
            self.abort(rid)

    async def generate(self, prompt_ids, params=None, request_id=None):
        if self.fatal_error is not None:
            raise EngineDeadError(self.fatal_error)
        agen = super().generate(prompt_ids, params, request_id)
        try:
            async for d in agen:
                yield d
        finally:
            await agen.aclose()

    def _emit(self, delta_or_error, request_id: str) -> None:
        # a failed step surfaces as RuntimeError("engine step failed: RankFailure(...)"): say it plainly
        if isinstance(delta_or_error, RuntimeError) and "RankFailure" in str(delta_or_error):
            msg = self.followers.dead() or str(delta_or_error)
            delta_or_error = EngineDeadError(msg)
            threading.Thread(target=self.fail, args=(msg,), daemon=True).start()
        super()._emit(delta_or_error, request_id)

    def stats(self) -> dict:
        s = super().stats()
        s["tp_size"] = self.group.size()
        s["tp_error"] = self.fatal_error
        if self.fatal_error is not None:
            s["engine_running"] = False
        return s

    def shutdown(self, timeout: float = 10.0) -> None:
        self._closed.set()
        if self.fatal_error is not None:  # a rank is dead or stuck: stop the rest first (unblocks rank 0)
            self.followers.close(timeout=0.5)
        super().shutdown(timeout)
        self.followers.close()  # EOF on their control pipes: the followers exit


def start_tp_engine(loaded, config, size: int, backend: str | None = None, ready_timeout: float = 600.0,
                    step_timeout: float = 300.0) -> TPAsyncEngine:
    """Start ranks 1..size-1 on `loaded.path` (each loads only its own shard), join the group as
    rank 0, shard `loaded.model` in place (or take it as loaded with `load_model(path, shard=(0,
    size))`, which reads only rank 0's shard) and return the engine. One tensor-parallel group per
    process. `ready_timeout`: seconds the other ranks may take to load the model; `step_timeout`:
    seconds one step may take before the engine declares a rank stuck."""
    if size < 2:
        raise ValueError(f"tensor parallelism needs at least 2 ranks, got {size}")
    model, _, _ = unpack_loaded(loaded)
    path = getattr(loaded, "path", None)
    if path is None:
        raise ValueError("tensor parallelism needs a LoadedModel with a path (the other ranks load it too)")
    backend = backend or default_backend()
    dtype = model_dtype(model)
    followers = Followers(path, dtype, config, size, backend, ready_timeout)
    try:
        group = init_group(0, size, backend, followers.contact)
        info = getattr(loaded, "shard", None)
        if info is None:  # loaded whole: cut it now
            info = shard_model(model, group)
        elif (info["rank"], info["size"]) != (0, size):
            raise ValueError(f"the model was loaded as rank {info['rank']} of {info['size']}, "
                             f"not rank 0 of {size}")
        else:  # loaded as rank 0's shard (load_model(path, shard=(0, size))): join it to the group
            attach_group(model, group)
        n = agree_num_blocks(model, config, dtype, group)
        if n < 2:
            raise ValueError(f"the KV budget holds fewer than 2 blocks on some rank ({n})")
        engine = TPAsyncEngine(loaded, replace(config, num_blocks=n), followers, group, info, step_timeout)
    except BaseException:
        followers.close(timeout=2)
        raise
    log.info("tensor parallel: %d ranks (%s), rank 0 holds %s, %d KV blocks per rank", size, backend, info, n)
    return engine
