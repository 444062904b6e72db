"""Where and with what a benchmark ran: device, cores, versions, commit, date."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata as md
import os
import platform
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _version(pkg: str) -> str | None:
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_names() -> list[str]:
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [x.strip() for x in out.splitlines() if x.strip()]


def git_commit() -> str | None:
    """HEAD (with -dirty when tracked files changed), or $JANG_SERVE_COMMIT where there is no git."""
    if not (REPO / ".git").exists():
        return os.environ.get("JANG_SERVE_COMMIT")
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha + ("-dirty" if dirty else "")) if sha else None


def loadavg() -> list[float]:
    """1/5/15-minute load averages: how busy the machine was (compare with `cores`)."""
    return [round(x, 2) for x in os.getloadavg()]


def environment() -> dict:
    gpus = gpu_names()
    return {
        "device": gpus[0] if gpus else cpu_model(),
        "gpus": gpus,
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": {"mlx": _version("mlx"), "mlx-lm": _version("mlx-lm"), "jang-serve": _version("jang-serve"),
                     "httpx": _version("httpx"), "uvicorn": _version("uvicorn"), "uvloop": _version("uvloop"),
                     "httptools": _version("httptools")},
        "jang_serve_commit": git_commit(),
        "loadavg": loadavg(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
