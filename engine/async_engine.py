"""AsyncEngine: the engine's whole public face for the server.

One background thread owns the model and the KV pool and runs `EngineCore.step()` in a loop.
Callers submit work through a thread-safe command queue; each request's deltas come back on an
asyncio.Queue of the caller's event loop. Closing the async iterator early (client gone) aborts
the request, which frees its blocks at the start of the next step.
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import queue
import threading
import traceback
import weakref
from typing import AsyncIterator

import mlx.core as mx

from .engine_config import EngineConfig
from .engine_core import EngineCore
from .sampling_params import Delta, SamplingParams

_req_ids = itertools.count()
_engines: "weakref.WeakSet[AsyncEngine]" = weakref.WeakSet()


@atexit.register
def _shutdown_all() -> None:
    for eng in list(_engines):
        eng.shutdown(timeout=5.0)


class EngineDeadError(RuntimeError):
    pass


class AsyncEngine:
    def __init__(self, loaded_model, config: EngineConfig | None = None):
        self.core = EngineCore(loaded_model, config)
        self.config = self.core.config
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._stats: dict = self.core.stats()
        self._error: BaseException | None = None
        _engines.add(self)

    # -- public -------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        return self.core.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.core.max_model_len

    @property
    def model_config(self) -> dict:
        return self.core.model_config

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="jang-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._commands.put(("wake",))
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    async def generate(self, prompt_ids: list[int], params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[Delta]:
        """Stream the deltas of one request (all n choices, told apart by Delta.index)."""
        params = params or SamplingParams()
        request_id = request_id or f"req-{next(_req_ids)}"
        self.core.validate(list(prompt_ids), params)
        if self._error is not None and not self.running:
            raise EngineDeadError(f"the engine loop has stopped: {self._error!r}")
        self.start()
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already running")
            self._streams[request_id] = (loop, q)
        self._commands.put(("add", request_id, list(prompt_ids), params))
        open_choices = set(range(params.n))
        try:
            while open_choices:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finish_reason is not None:
                    open_choices.discard(item.index)
                yield item
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
            if open_choices:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Abort a request (safe from any thread). Its blocks are freed before the next step."""
        self._commands.put(("abort", request_id))

    def stats(self) -> dict:
        """A snapshot taken after the latest step."""
        s = dict(self._stats)
        s["engine_running"] = self.running
        return s

    # -- engine thread ------------------------------------------------------------------------
    def _emit(self, delta_or_error, request_id: str) -> None:
        with self._lock:
            target = self._streams.get(request_id)
        if target is None:
            return
        loop, q = target
        try:
            loop.call_soon_threadsafe(q.put_nowait, delta_or_error)
        except RuntimeError:  # the caller's loop is closed
            pass

    def _drain(self, block: bool) -> None:
        try:
            cmd = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._run_command(cmd)
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return

    def _run_command(self, cmd) -> None:
        kind = cmd[0]
        if kind == "add":
            _, rid, prompt, params = cmd
            try:
                self.core.add_request(rid, prompt, params)
            except Exception as e:  # bad request: tell only its caller
                self._emit(e, rid)
        elif kind == "abort":
            for d in self.core.abort(cmd[1]):
                self._emit(d, d.request_id)

    def _loop(self) -> None:
        try:
            self._serve()
        finally:
            mx.clear_streams()  # MLX needs this at the end of a thread for a clean process exit

    def _serve(self) -> None:
        while not self._stop.is_set():
            self._drain(block=not self.core.has_work())
            if self._stop.is_set():
                break
            if not self.core.has_work():
                self._stats = self.core.stats()
                continue
            try:
                deltas = self.core.step()
            except Exception as e:  # fail every live request, keep serving new ones
                traceback.print_exc()
                self._error = e
                for rid in list(self.core.requests):
                    self.core.abort(rid)
                    self._emit(RuntimeError(f"engine step failed: {e!r}"), rid)
                continue
            for d in deltas:
                self._emit(d, d.request_id)
            self._stats = self.core.stats()
