"""Start and stop a server process on a free loopback port, and wait until it answers."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server child process. `cmd` may contain {port}; the base URL is http://127.0.0.1:{port}."""

    def __init__(self, cmd: list[str] | str, name: str, port: int | None = None, log_path: str | Path | None = None,
                 env: dict | None = None, ready_path: str = "/health"):
        self.port = port or free_port()
        if isinstance(cmd, str):
            cmd = shlex.split(cmd)
        self.cmd = [c.replace("{port}", str(self.port)) for c in cmd]
        self.name = name
        self.url = f"http://127.0.0.1:{self.port}"
        self.ready_path = ready_path
        self.log_path = Path(log_path) if log_path else None
        self.env = dict(os.environ, **(env or {}))
        self.proc: subprocess.Popen | None = None
        self._log = None

    def start(self, timeout: float = 300.0) -> "ServerProcess":
        if self.log_path:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "wb")
        out = self._log or subprocess.DEVNULL
        # A new session so stop() can signal the server and any children it started.
        self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with code {self.proc.returncode} before it was ready; "
                                   f"command: {shlex.join(self.cmd)}; log: {self.tail()}")
            try:
                if httpx.get(self.url + self.ready_path, timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"{self.name} did not answer {self.ready_path} within {timeout:.0f}s; log: {self.tail()}")

    def tail(self, n: int = 2000) -> str:
        if not self.log_path or not self.log_path.exists():
            return "(no log)"
        return self.log_path.read_bytes()[-n:].decode("utf-8", "replace")

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        if self._log:
            self._log.close()
            self._log = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


# `python -m mlx_lm ...`, but with the same BLAS our server gets: importing jang_serve first loads the system
# OpenBLAS for MLX on Linux (jang_serve/_blas.py), so both servers run the same matmul library.
_MLX_LM_MAIN = "import sys, runpy, jang_serve; sys.argv[0] = 'mlx_lm'; runpy.run_module('mlx_lm', run_name='__main__')"


def mlx_lm_cmd(model_dir: str | Path, decode_concurrency: int = 32, extra: list[str] = ()) -> list[str]:
    """mlx-lm's own server (`python -m mlx_lm server`, same BLAS as ours) on {port}."""
    return [sys.executable, "-c", _MLX_LM_MAIN, "server", "--model", str(model_dir), "--host", "127.0.0.1",
            "--port", "{port}", "--decode-concurrency", str(decode_concurrency), "--log-level", "WARNING",
            *extra]


def jang_serve_cmd(model: str | Path | None, extra: list[str] = ()) -> list[str]:
    """Our server (`jang-serve`, the console script next to this Python) on {port}."""
    exe = Path(sys.executable).with_name("jang-serve")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "jang_serve.server.cli"]
    if model is not None:
        cmd += ["--model", str(model)]
    return cmd + ["--host", "127.0.0.1", "--port", "{port}", *extra]


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (Linux /proc)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")
