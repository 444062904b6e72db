"""Shared live servers for the server tests (no tests here).

`smollm2_server()` starts the real `jang-serve` CLI once per test session, in a subprocess on a
random free port of 127.0.0.1, serving the embedded default model (SmolLM2-135M-Instruct, converted
once into JANG_SERVE_HOME under the test cache and reused). Test modules share it through this
module's cache; it is stopped when the session ends.
"""

from __future__ import annotations

import atexit
import functools
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from realdata import CACHE

API_KEY = "sk-test-key"
ADMIN_KEY = "admin-test-key"
HOME = CACHE / "jang-home"  # the default model's converted bundle lives here between runs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CLIServer:
    """`python -m jang_serve.server.cli ...` in a subprocess; .url, .base_url, .logs()."""

    def __init__(self, args: list[str], env: dict | None = None, home: Path = HOME):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.base_url = self.url + "/v1"
        self.log_path = Path(tempfile.mkstemp(prefix="jang-serve-", suffix=".log")[1])
        full_env = dict(os.environ, JANG_SERVE_HOME=str(home), PYTHONUNBUFFERED="1", **(env or {}))
        self.proc = subprocess.Popen([sys.executable, "-m", "jang_serve.server.cli", "--port", str(self.port), *args],
                                     stdout=open(self.log_path, "wb"), stderr=subprocess.STDOUT, env=full_env,
                                     start_new_session=True)
        self.health_codes: list[int] = []
        atexit.register(self.stop)

    def wait_ready(self, timeout: float = 240.0) -> "CLIServer":
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"jang-serve exited with {self.proc.returncode}:\n{self.logs()[-3000:]}")
            try:
                r = httpx.get(self.url + "/health", timeout=5)
                self.health_codes.append(r.status_code)
                if r.status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"jang-serve not healthy after {timeout} s:\n{self.logs()[-3000:]}")

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@functools.lru_cache(maxsize=None)
def smollm2_server() -> CLIServer:
    """The default model served by the CLI with an API key, an admin key and small limits."""
    models_dir = tempfile.mkdtemp(prefix="jang-models-")
    srv = CLIServer(["--api-key", API_KEY, "--admin-key", ADMIN_KEY, "--models-dir", models_dir,
                     "--kv-memory", "0.25", "--max-num-seqs", "4", "--max-queue", "0",
                     "--sse-keepalive-s", "0.05", "--cors-origins", "http://example.test", "--log-level", "warning"])
    return srv.wait_ready()


def auth(key: str = API_KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}
