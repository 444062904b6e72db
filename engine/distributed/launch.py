"""Starting the ranks: rank 0 is the serving process itself; it spawns ranks 1..N-1 as child
processes the way `mlx.launch` does on one host (a ring hostfile + MLX_RANK, or the NCCL
variables + CUDA_VISIBLE_DEVICES), so it can watch them and stop them.

Control (not tensors) goes over each follower's stdin/stdout pipes: the follower prints one
READY line once its model is loaded (so rank 0 never blocks in `mx.distributed.init` waiting for
a rank that failed to load), and rank 0 writes one byte before each step (the followers sleep in
a blocking read between steps instead of spinning in a collective; EOF means rank 0 is gone).
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict

import mlx.core as mx

READY = "JANG_TP_READY"
_DTYPES = {mx.float32: "float32", mx.bfloat16: "bfloat16", mx.float16: "float16"}


class RankFailure(RuntimeError):
    """A tensor-parallel rank died, failed to start, or stopped answering."""


def default_backend() -> str:
    """NCCL on a CUDA GPU, else the ring backend (loopback TCP) on CPU."""
    return "nccl" if mx.default_device() == mx.gpu and mx.cuda.is_available() else "ring"


def dtype_name(dtype) -> str:
    return _DTYPES.get(dtype, "auto")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def rank_env(rank: int, size: int, backend: str, contact: dict) -> dict:
    """The environment variables `mx.distributed.init` reads for this rank."""
    env = {"MLX_RANK": str(rank), "MLX_WORLD_SIZE": str(size)}
    if backend == "ring":
        env["MLX_HOSTFILE"] = contact["hostfile"]
    else:  # nccl: rank 0's address; NVLink multicast off (shared GPU hosts require it)
        env.update(NCCL_HOST_IP="127.0.0.1", NCCL_PORT=str(contact["nccl_port"]), NCCL_NVLS_ENABLE="0",
                   TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    return env


def make_contact(size: int, backend: str) -> dict:
    if backend == "ring":
        fd, path = tempfile.mkstemp(prefix="jang-tp-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump([[f"127.0.0.1:{p}"] for p in _free_ports(size)], f)
        return {"hostfile": path}
    if backend == "nccl":
        return {"nccl_port": _free_ports(1)[0]}
    raise ValueError(f"unknown tensor-parallel backend {backend!r}; use ring or nccl")


def init_group(rank: int, size: int, backend: str, contact: dict):
    """Join the group (blocks until every rank has joined)."""
    env = rank_env(rank, size, backend, contact)
    saved = {k: os.environ.get(k) for k in env if k.startswith("MLX_") or k in ("NCCL_HOST_IP", "NCCL_PORT")}
    os.environ.update(env)
    try:
        group = mx.distributed.init(strict=True, backend=backend)
    finally:  # children started later (admin jobs) must not inherit this rank's identity (multicast stays off)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if group.size() != size or group.rank() != rank:
        raise RankFailure(f"mx.distributed.init gave rank {group.rank()} of {group.size()}, "
                          f"expected {rank} of {size}")
    return group


class Followers:
    """Rank 0's handle on ranks 1..N-1: start, wake per step, liveness, stop."""

    def __init__(self, model_path, dtype, engine_config, size: int, backend: str, ready_timeout: float = 600.0):
        self.size, self.backend = size, backend
        self.contact = make_contact(size, backend)
        self.procs: list[subprocess.Popen] = []
        cfg = json.dumps(asdict(engine_config))
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
        for rank in range(1, size):
            env = dict(os.environ, **rank_env(rank, size, backend, self.contact))
            if backend == "nccl":  # one GPU per rank; rank 0 keeps the first
                env["CUDA_VISIBLE_DEVICES"] = visible[rank] if len(visible) > rank and visible[0] else str(rank)
            cmd = [sys.executable, "-m", "jang_serve.engine.distributed.worker", "--model", str(model_path),
                   "--dtype", dtype_name(dtype), "--engine-config", cfg, "--rank", str(rank), "--size", str(size),
                   "--backend", backend]
            self.procs.append(subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE))
        try:
            self._wait_ready(ready_timeout)
        except BaseException:
            self.close(timeout=2)
            raise

    def _wait_ready(self, timeout: float) -> None:
        pending = {p.stdout.fileno(): (i + 1, p) for i, p in enumerate(self.procs)}
        bufs = {fd: b"" for fd in pending}
        deadline = time.monotonic() + timeout
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RankFailure(f"tensor-parallel ranks {sorted(r for r, _ in pending.values())} did not load "
                                  f"the model within {timeout:.0f} s")
            ready, _, _ = select.select(list(pending), [], [], min(left, 1.0))
            for fd in ready:
                rank, p = pending[fd]
                chunk = os.read(fd, 4096)
                bufs[fd] += chunk
                if READY.encode() in bufs[fd]:
                    del pending[fd]
                elif not chunk:
                    code = p.wait()
                    raise RankFailure(f"tensor-parallel rank {rank} exited with status {code} while loading "
                                      f"the model (see its log above)")

    def wake(self) -> None:
        """One byte per follower: 'a step plan follows'."""
        for rank, p in enumerate(self.procs, 1):
            try:
                p.stdin.write(b"s")
                p.stdin.flush()
            except (BrokenPipeError, OSError, ValueError):
                raise RankFailure(self.dead() or f"tensor-parallel rank {rank} closed its control pipe") from None

    def dead(self) -> str | None:
        """A message naming the first follower that has exited, else None."""
        for rank, p in enumerate(self.procs, 1):
            code = p.poll()
            if code is not None:
                how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
                return f"tensor-parallel rank {rank} (pid {p.pid}) {how}; restart the server"
        return None

    def close(self, timeout: float = 10.0) -> None:
        """EOF on every control pipe (followers exit), then wait; kill what is left."""
        for p in self.procs:
            try:
                p.stdin.close()
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            if p.stdout:
                p.stdout.close()
        path = self.contact.get("hostfile")
        if path and os.path.exists(path):
            os.unlink(path)
