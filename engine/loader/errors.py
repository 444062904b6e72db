"""The one error type the loaders raise: every message names the file and the problem."""

from __future__ import annotations

import json
from pathlib import Path


class LoadError(ValueError):
    """A model path we cannot load. `str(err)` starts with the offending file's path."""

    def __init__(self, file, problem: str):
        self.file = str(file)
        self.problem = problem
        super().__init__(f"{self.file}: {problem}")


def read_json(path: Path, what: str = "JSON file") -> dict:
    """Parse a JSON object from `path`, turning every failure into a LoadError."""
    if not path.is_file():
        raise LoadError(path, f"missing ({what} not found)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LoadError(path, f"bad JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise LoadError(path, f"not UTF-8 text ({e.reason})") from None
    if not isinstance(data, dict):
        raise LoadError(path, f"bad JSON: expected an object, got {type(data).__name__}")
    return data
