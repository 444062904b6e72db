"""The conversion child process: `python -m jang_serve.server.admin.worker '<json spec>'`.

Runs quantize.convert into a staging folder and reports on a private copy of stdout, one JSON
event per line prefixed with "@@job ": progress, done (with the result) or error. Everything else
the conversion prints goes to stderr, which the server keeps as the job's log. The child exits
when its parent (the server) goes away.
"""

from __future__ import annotations

import json
import os
import sys
import time

PREFIX = "@@job "


def main() -> int:
    spec = json.loads(sys.argv[1])
    events = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints from libraries go to the log, not the event channel
    sys.stdout = sys.stderr
    parent = os.getppid()

    def emit(kind: str, **data) -> None:
        events.write(PREFIX + json.dumps({"event": kind, **data}) + "\n")
        events.flush()

    last = [0.0]

    def progress(info: dict) -> None:
        if os.getppid() != parent:
            os._exit(3)  # the server is gone: stop
        now = time.monotonic()
        frac = float(info.get("fraction") or 0.0)
        if now - last[0] < 0.1 and frac < 1.0:
            return
        last[0] = now
        emit("progress", fraction=frac, tensor=info.get("tensor"), eta_s=info.get("eta_s"),
             message=info.get("message"))

    try:
        source = spec["source"]
        if spec["source_kind"] == "hub":
            emit("progress", fraction=0.0, tensor=None, eta_s=None, message=f"downloading {source}")
            source = _download(source)
        from jang_serve.quantize import convert

        emit("progress", fraction=0.0, tensor=None, eta_s=None, message="converting")
        res = convert(source, spec["staging"], profile=spec.get("profile"), bits=spec.get("bits"),
                      method=spec.get("method"), group_size=spec.get("group_size"), progress=progress)
        emit("done", result={"path": str(getattr(res, "path", spec["staging"])),
                             "average_bits": getattr(res, "average_bits", None),
                             "size_bytes": getattr(res, "size_bytes", None),
                             "profile": getattr(res, "profile", spec.get("profile")),
                             "method": getattr(res, "method", spec.get("method"))})
        return 0
    except Exception as e:  # reported to the server as the job's error
        import traceback

        traceback.print_exc()
        emit("error", message=f"{type(e).__name__}: {e}")
        return 1


def _download(repo_id: str) -> str:
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
    except Exception as e:
        raise RuntimeError(f"could not download {repo_id!r} from the Hugging Face Hub ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}); this machine may be offline: "
                           "download the model elsewhere and pass its local path as 'source'") from None


if __name__ == "__main__":
    sys.exit(main())
