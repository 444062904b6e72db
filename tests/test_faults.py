"""Faults: each ends in a clear state and message, with nothing half-written visible.

- a conversion child killed with SIGKILL (admin API) -> job `failed`, "killed by signal SIGKILL";
- the server killed and restarted during a job -> the child stops, the job is `interrupted`;
- a model folder with a truncated shard -> convert() and jang-serve both name the file;
- a full disk for the output: the models dir on a 2 MB tmpfs (admin API), and RLIMIT_FSIZE on a
  convert() child -> a clear error, no output and no temp folder left.
Conversion sources are real: the SmolLM2-135M GGUF (slow enough to be killed mid-way) and the tiny test model.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from realdata import smollm2_gguf
from serve_helpers import start_jang_serve, tiny_model_dir

ADMIN = "faults-admin-key"
H = {"Authorization": f"Bearer {ADMIN}"}


def _submit(url: str, **body) -> dict:
    r = httpx.post(url + "/admin/convert", json=body, headers=H, timeout=30)
    assert r.status_code == 202, r.text
    return r.json()


def _job(url: str, job_id: str) -> dict:
    r = httpx.get(f"{url}/admin/jobs/{job_id}", headers=H, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def _wait(url: str, job_id: str, pred, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = _job(url, job_id)
        if pred(job):
            return job
        assert time.monotonic() < deadline, f"job never reached the expected state: {job}"
        time.sleep(0.1)


def _final(job: dict) -> bool:
    return job["state"] in ("completed", "failed", "cancelled", "interrupted")


def _children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (the conversion workers of a server)."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid:
                    out.append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _visible(models_dir: Path) -> list[str]:
    """What a user would see in the models folder: everything but the job database and empty staging."""
    seen = []
    for p in models_dir.iterdir():
        if p.name.startswith(".jobs.sqlite"):
            continue
        if p.name == ".staging" and not any(p.iterdir()):
            continue
        seen.append(p.name)
    return seen


def _server(home: Path, *extra: str):
    return start_jang_serve(None, "--admin-key", ADMIN, *extra, home=home)


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


@pytest.fixture(scope="module")
def admin_server():
    """jang-serve with the admin API; its models folder is a 4 MB tmpfs when this machine lets us mount one."""
    root = Path(tempfile.mkdtemp(prefix="jang-faults-"))
    models = root / "models"
    tmpfs = _mount_tmpfs(models, "4m")
    srv = _server(root / "home", "--models-dir", str(models), "--jobs-db", str(root / "jobs.sqlite"))
    srv.models, srv.tmpfs = models, tmpfs
    try:
        yield srv
    finally:
        srv.stop()
        if tmpfs:
            subprocess.run(["umount", str(models)], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def test_sigkill_conversion_child(admin_server):
    srv, models = admin_server, admin_server.models
    # GPTQ (about two minutes here) keeps the child running when it is killed; the RTN conversion
    # ends about 0.4 s after its first progress report, which a fast machine can race.
    job = _submit(srv.url, source=str(smollm2_gguf()), profile="JANG_4M", method="gptq", output="smol-killed")
    job = _wait(srv.url, job["id"], lambda j: j["state"] == "running" and j["percent"] > 0 or _final(j))
    assert job["state"] == "running", job
    (child,) = _children(srv.pid)
    os.kill(child, signal.SIGKILL)
    job = _wait(srv.url, job["id"], _final)
    assert job["state"] == "failed"
    assert "killed by signal SIGKILL" in job["error"]
    assert _visible(models) == []  # no partial model, no staging left
    # the server itself is unharmed and still answers
    r = httpx.post(srv.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 3}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    # and a later job still runs to completion and is published atomically
    ok = _submit(srv.url, source=str(tiny_model_dir()), profile="JANG_4M", output="tiny-ok")
    ok = _wait(srv.url, ok["id"], _final)
    assert ok["state"] == "completed", ok
    assert _visible(models) == ["tiny-ok"] and (models / "tiny-ok" / "config.json").is_file()


def test_full_disk_models_dir(admin_server):
    """The models folder (a tmpfs) has less room left than one bundle needs: the job fails cleanly."""
    srv, models = admin_server, admin_server.models
    if not srv.tmpfs:
        pytest.skip("cannot mount a tmpfs here (needs root); test_full_disk_rlimit covers a full disk")
    ok = _submit(srv.url, source=str(tiny_model_dir()), profile="JANG_4M", output="tiny-fits")
    assert _wait(srv.url, ok["id"], _final)["state"] == "completed"
    need = sum(f.stat().st_size for f in (models / "tiny-fits").rglob("*") if f.is_file())
    before = set(_visible(models))
    # fill the disk so that only half a bundle still fits
    filler = models / "filler.bin"
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, shutil.disk_usage(models).free - need // 2))
    free = shutil.disk_usage(models).free
    assert free < need
    job = _submit(srv.url, source=str(tiny_model_dir()), profile="JANG_4M", output="tiny-full")
    job = _wait(srv.url, job["id"], _final)
    assert job["state"] == "failed", job
    # today the message is MLX's "[write] Unable to write N bytes to file." (no path, no reason)
    assert any(m in job["error"] for m in ("Unable to write", "No space left", "Errno 28")), job["error"]
    assert set(_visible(models)) == before | {"filler.bin"}  # no partial bundle, no staging left
    assert shutil.disk_usage(models).free == free  # every partial byte was removed
    filler.unlink()


def test_server_killed_and_restarted_during_job(tmp_path):
    home = tmp_path / "home"
    srv = _server(home)
    job = _submit(srv.url, source=str(smollm2_gguf()), profile="JANG_4M", method="gptq", output="smol-restart")
    job = _wait(srv.url, job["id"], lambda j: j["state"] == "running" and j["percent"] > 0 or _final(j))
    assert job["state"] == "running", job
    (child,) = _children(srv.pid)
    os.killpg(srv.pid, signal.SIGKILL)  # the server only (its session); the child has its own session
    srv.proc.wait(10)
    # the orphaned child notices its server is gone and stops by itself
    deadline = time.monotonic() + 60
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(child), "the conversion child outlived its server"
    srv2 = _server(home)
    try:
        after = _job(srv2.url, job["id"])
        assert after["state"] == "interrupted", after
        assert after["error"]
        assert _visible(home / "models") == []
        assert not (home / "models" / "smol-restart").exists()
    finally:
        srv2.stop()


def _truncated_copy(dst: Path) -> Path:
    shutil.copytree(tiny_model_dir(), dst)
    shard = dst / "model.safetensors"
    os.truncate(shard, shard.stat().st_size // 2)
    return shard


def test_truncated_shard_convert(tmp_path):
    from jang_serve.quantize import convert

    src = tmp_path / "trunc"
    _truncated_copy(src)
    out_parent = tmp_path / "out"
    with pytest.raises(Exception) as e:
        convert(src, out_parent / "x", profile="JANG_4M")
    assert not out_parent.exists() or list(out_parent.iterdir()) == []  # nothing half-written
    assert "model.safetensors" in str(e.value), f"error does not name the truncated file: {e.value!r}"
    assert "truncated" in str(e.value)


def test_truncated_shard_convert_leaves_nothing(tmp_path):
    from jang_serve.quantize import convert

    src = tmp_path / "trunc"
    _truncated_copy(src)
    out_parent = tmp_path / "out"
    with pytest.raises(Exception):
        convert(src, out_parent / "x", profile="JANG_4M")
    assert not out_parent.exists() or list(out_parent.iterdir()) == []


def test_truncated_shard_server(tmp_path):
    """jang-serve refuses to start on it, naming the file, with a failing exit status."""
    src = tmp_path / "trunc"
    shard = _truncated_copy(src)
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        rc = subprocess.run([sys.executable, "-m", "jang_serve.server.cli", "--model", str(src), "--port", "0",
                             "--kv-memory", "0.05", "--log-level", "warning"], stdout=log,
                            stderr=subprocess.STDOUT, timeout=120,
                            env=dict(os.environ, JANG_SERVE_HOME=str(tmp_path / "home"))).returncode
    text = log_path.read_text()
    assert str(shard) in text and "truncated" in text, text[-2000:]
    assert rc == 1, f"jang-serve exited {rc} on an unloadable model:\n{text[-1000:]}"


_RLIMIT_CHILD = r"""
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
from jang_serve.quantize import convert
try:
    convert(sys.argv[1], sys.argv[2], profile="JANG_4M")
except Exception as e:
    print("CONVERT-ERROR", type(e).__name__, e)
    sys.exit(3)
"""


def test_full_disk_rlimit(tmp_path):
    """convert() in a child whose files may not grow past 100 kB: an error, nothing left behind."""
    out_parent = tmp_path / "out"
    out_parent.mkdir()
    r = subprocess.run([sys.executable, "-c", _RLIMIT_CHILD, str(tiny_model_dir()), str(out_parent / "tiny")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 3, r.stdout + r.stderr[-2000:]
    # MLX's writer says "[write] Unable to write N bytes to file"; Python's says "File too large"
    assert "CONVERT-ERROR" in r.stdout and ("File too large" in r.stdout or "Unable to write" in r.stdout), r.stdout
    assert list(out_parent.iterdir()) == []  # no output, no hidden temp folder
