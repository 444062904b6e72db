"""SQLite store of conversion jobs, so the job list survives a server restart.

Only the server process writes here (the child reports progress through a pipe). On open, jobs
left `queued` or `running` by a previous server are marked `interrupted`.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from pathlib import Path

STATES = ("queued", "running", "completed", "failed", "cancelled", "interrupted")
FINAL = ("completed", "failed", "cancelled", "interrupted")
LOG_LINES = 40

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    spec TEXT NOT NULL,
    output TEXT NOT NULL,
    percent REAL NOT NULL DEFAULT 0,
    tensor TEXT,
    eta_s REAL,
    message TEXT,
    log TEXT NOT NULL DEFAULT '[]',
    result TEXT,
    error TEXT,
    pid INTEGER,
    created REAL NOT NULL,
    started REAL,
    finished REAL
)
"""


class JobStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.execute(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def interrupt_leftovers(self) -> list[dict]:
        """Jobs a previous server left queued or running become `interrupted`; returns them."""
        left = [j for j in self.list() if j["state"] in ("queued", "running")]
        for j in left:
            self.update(j["id"], state="interrupted", finished=time.time(), pid=None,
                        error="the server stopped while this job was " + j["state"])
        return left

    def create(self, spec: dict, output: str) -> dict:
        job_id = "job_" + uuid.uuid4().hex[:16]
        with self._lock:
            self._db.execute("INSERT INTO jobs (id, state, spec, output, created) VALUES (?, 'queued', ?, ?, ?)",
                             (job_id, json.dumps(spec), output, time.time()))
        return self.get(job_id)

    def update(self, job_id: str, **fields) -> None:
        if "result" in fields and fields["result"] is not None:
            fields["result"] = json.dumps(fields["result"])
        if "state" in fields and fields["state"] not in STATES:
            raise ValueError(f"unknown job state {fields['state']!r}")
        cols = ", ".join(f"{k} = ?" for k in fields)
        with self._lock:
            self._db.execute(f"UPDATE jobs SET {cols} WHERE id = ?", (*fields.values(), job_id))

    def append_log(self, job_id: str, line: str) -> None:
        with self._lock:
            row = self._db.execute("SELECT log FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return
            log = json.loads(row["log"])
            log.append(line.rstrip()[:1000])
            self._db.execute("UPDATE jobs SET log = ? WHERE id = ?", (json.dumps(log[-LOG_LINES:]), job_id))

    def get(self, job_id: str) -> dict | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _row(row) if row else None

    def list(self) -> list[dict]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs ORDER BY created").fetchall()
        return [_row(r) for r in rows]

    def next_queued(self) -> dict | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE state = 'queued' ORDER BY created LIMIT 1").fetchone()
        return _row(row) if row else None


def _row(row: sqlite3.Row) -> dict:
    d = dict(row)
    d["spec"] = json.loads(d["spec"])
    d["log"] = json.loads(d["log"])
    d["result"] = json.loads(d["result"]) if d["result"] else None
    return d


def public_view(job: dict) -> dict:
    """The job as the REST API shows it."""
    spec = job["spec"]
    return {
        "id": job["id"],
        "object": "conversion_job",
        "state": job["state"],
        "source": spec.get("source"),
        "output": job["output"],
        "profile": spec.get("profile"),
        "bits": spec.get("bits"),
        "method": spec.get("method"),
        "load_after": spec.get("load_after", False),
        "percent": round(float(job["percent"] or 0.0), 2),
        "current_tensor": job["tensor"],
        "eta_s": job["eta_s"],
        "message": job["message"],
        "log_tail": job["log"][-20:],
        "result": job["result"],
        "error": job["error"],
        "pid": job["pid"],
        "created_at": job["created"],
        "started_at": job["started"],
        "finished_at": job["finished"],
    }
