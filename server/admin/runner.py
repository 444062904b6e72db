"""Runs conversion jobs in child processes, one job per process, and publishes their output.

A child converts into <models_dir>/.staging/<job id>/; only when it reports success does the
server rename that folder to its final name (atomic on one filesystem), so a crash, a SIGKILL or a
cancel never leaves a partial model visible. A crash or out-of-memory kill of a child cannot take
the server down; it only marks the job failed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from .store import FINAL, JobStore
from .worker import PREFIX

log = logging.getLogger("jang_serve.server.admin")


class JobRunner:
    def __init__(self, store: JobStore, models_dir: Path, max_jobs: int = 1,
                 on_completed: Callable[[dict], None] | None = None):
        self.store = store
        self.models_dir = Path(models_dir)
        self.staging_root = self.models_dir / ".staging"
        self.max_jobs = max(1, max_jobs)
        self.on_completed = on_completed
        self._procs: dict[str, subprocess.Popen] = {}
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self.models_dir.mkdir(parents=True, exist_ok=True)
        for job in self.store.interrupt_leftovers():
            shutil.rmtree(self.staging_root / job["id"], ignore_errors=True)
        self._thread = threading.Thread(target=self._loop, name="jang-admin-jobs", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        with self._lock:
            procs = dict(self._procs)
        for job_id, proc in procs.items():
            self._kill(proc)
            self.store.update(job_id, state="interrupted", finished=time.time(), pid=None,
                              error="the server stopped while this job was running")
            shutil.rmtree(self.staging_root / job_id, ignore_errors=True)
        if self._thread is not None:
            self._thread.join(timeout=5)

    # ------------------------------------------------------------ API

    def submit(self, spec: dict, output: str) -> dict:
        job = self.store.create(spec, output)
        self._wake.set()
        return job

    def cancel(self, job_id: str) -> dict | None:
        job = self.store.get(job_id)
        if job is None or job["state"] in FINAL:
            return job
        with self._lock:
            self._cancelled.add(job_id)
            proc = self._procs.get(job_id)
        if proc is None:
            self.store.update(job_id, state="cancelled", finished=time.time(), error="cancelled before it started")
        else:
            self._kill(proc, grace=2.0)
        return self.store.get(job_id)

    def child_pid(self, job_id: str) -> int | None:
        with self._lock:
            proc = self._procs.get(job_id)
        return proc.pid if proc else None

    # ------------------------------------------------------------ internals

    def _loop(self) -> None:
        while not self._stop:
            with self._lock:
                busy = len(self._procs)
            job = self.store.next_queued() if busy < self.max_jobs else None
            if job is None:
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                self._launch(job)
            except Exception as e:  # a job that cannot even start fails alone
                log.exception("could not start job %s", job["id"])
                self.store.update(job["id"], state="failed", finished=time.time(), error=f"could not start: {e}")

    def _launch(self, job: dict) -> None:
        job_id = job["id"]
        staging = self.staging_root / job_id
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        spec = dict(job["spec"], staging=str(staging / "out"))
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_ETAG_TIMEOUT="10", HF_HUB_DOWNLOAD_TIMEOUT="30")
        proc = subprocess.Popen([sys.executable, "-m", "jang_serve.server.admin.worker", json.dumps(spec)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, bufsize=1, env=env, start_new_session=True)
        with self._lock:
            self._procs[job_id] = proc
        self.store.update(job_id, state="running", started=time.time(), pid=proc.pid, message="starting")
        threading.Thread(target=self._watch, args=(job_id, proc, staging), daemon=True,
                         name=f"jang-job-{job_id}").start()

    def _watch(self, job_id: str, proc: subprocess.Popen, staging: Path) -> None:
        outcome: dict = {}
        err_thread = threading.Thread(target=self._read_log, args=(job_id, proc), daemon=True)
        err_thread.start()
        for line in proc.stdout:
            if not line.startswith(PREFIX):
                continue
            try:
                ev = json.loads(line[len(PREFIX):])
            except ValueError:
                continue
            kind = ev.get("event")
            if kind == "progress":
                fields = dict(percent=min(99.9, 100.0 * float(ev.get("fraction") or 0.0)), eta_s=ev.get("eta_s"),
                              message=ev.get("message"))
                if ev.get("tensor"):
                    fields["tensor"] = ev["tensor"]
                self.store.update(job_id, **fields)
                if ev.get("message"):
                    self.store.append_log(job_id, f"{fields['percent']:5.1f}% {ev['message']}")
            elif kind in ("done", "error"):
                outcome = ev
        rc = proc.wait()
        err_thread.join(timeout=5)
        with self._lock:
            self._procs.pop(job_id, None)
            cancelled = job_id in self._cancelled
            self._cancelled.discard(job_id)
        if self._stop:
            return  # shutdown() marks it interrupted
        try:
            self._finish(job_id, rc, outcome, cancelled, staging)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            self._wake.set()

    def _finish(self, job_id: str, rc: int, outcome: dict, cancelled: bool, staging: Path) -> None:
        now = time.time()
        job = self.store.get(job_id)
        if cancelled:
            self.store.update(job_id, state="cancelled", finished=now, pid=None, error="cancelled by request")
            return
        if rc == 0 and outcome.get("event") == "done":
            final = self.models_dir / job["output"]
            built = staging / "out"
            if final.exists():
                self.store.update(job_id, state="failed", finished=now, pid=None,
                                  error=f"output {job['output']!r} appeared while the job ran; not overwritten")
                return
            final.parent.mkdir(parents=True, exist_ok=True)
            os.rename(built, final)  # the publish step: atomic, same filesystem
            result = dict(outcome.get("result") or {}, path=str(final))
            self.store.update(job_id, state="completed", finished=now, pid=None, percent=100.0, eta_s=0.0,
                              message="done", result=result)
            if self.on_completed is not None:
                try:
                    self.on_completed(self.store.get(job_id))
                except Exception as e:
                    log.exception("after-job hook failed for %s", job_id)
                    self.store.append_log(job_id, f"load_after failed: {e}")
            return
        if rc < 0:
            try:
                sig = signal.Signals(-rc).name
            except ValueError:
                sig = str(-rc)
            error = f"the conversion process was killed by signal {sig}"
            if sig == "SIGKILL":
                error += " (out of memory, or killed from outside)"
        elif outcome.get("event") == "error":
            error = outcome.get("message") or "conversion failed"
        else:
            error = f"the conversion process exited with status {rc}"
        self.store.update(job_id, state="failed", finished=now, pid=None, error=error)

    def _read_log(self, job_id: str, proc: subprocess.Popen) -> None:
        for line in proc.stderr:
            line = line.rstrip()
            if line:
                # progress bars redraw with \r: keep the last state of the line
                self.store.append_log(job_id, line.split("\r")[-1])

    @staticmethod
    def _kill(proc: subprocess.Popen, grace: float = 0.0) -> None:
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM if grace else signal.SIGKILL)
        except ProcessLookupError:
            return
        if grace:
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
