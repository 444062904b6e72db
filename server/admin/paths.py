"""Where a conversion job may write: only inside the models directory.

Output names are relative paths of plain components; absolute paths, `..`, hidden names and
symlinks that lead out of the models directory are refused.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

from ..errors import APIError

_COMPONENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+\-]{0,127}$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9_.\-]+$")


def resolve_output(models_dir: Path, name: str) -> Path:
    """The absolute path for output `name` under models_dir, or a 400/409 APIError saying why not."""
    if "\\" in name or "\x00" in name:
        raise APIError(400, f"output {name!r} must be a relative path with '/' separators", param="output")
    p = PurePosixPath(name)
    if p.is_absolute():
        raise APIError(400, f"output {name!r} is an absolute path; give a name inside the models directory",
                       param="output", code="output_outside_models_dir")
    for part in p.parts:
        if part == "..":
            raise APIError(400, f"output {name!r} contains '..'; outputs must stay inside the models directory",
                           param="output", code="output_outside_models_dir")
        if not _COMPONENT.match(part):
            raise APIError(400, f"output {name!r}: {part!r} is not an allowed name (letters, digits, '._+-', "
                                "not starting with '.')", param="output")
    root = models_dir.resolve()
    target = root.joinpath(*p.parts)
    # follow any symlinks among the parents that already exist
    real = target.parent.resolve() / target.name
    if not real.is_relative_to(root):
        raise APIError(400, f"output {name!r} leads outside the models directory (through a symlink)",
                       param="output", code="output_outside_models_dir")
    if target.is_symlink() or target.exists():
        raise APIError(409, f"output {name!r} already exists in the models directory", param="output",
                       code="output_exists")
    return real


def classify_source(source: str) -> tuple[str, str]:
    """('local', absolute path) or ('hub', repo id), or a 400 APIError for something that is neither."""
    path = Path(source).expanduser()
    if path.exists():
        return "local", str(path.resolve())
    if _HUB_ID.match(source) and not source.startswith(("./", "../")):
        return "hub", source
    raise APIError(400, f"source {source!r} is neither an existing local path nor a Hugging Face repo id "
                        "(owner/name)", param="source", code="source_not_found")


def default_output_name(source: str, profile: str | None, bits: float | None) -> str:
    base = Path(source.rstrip("/")).name
    if base.endswith(".gguf"):
        base = base[:-5]
    base = re.sub(r"[^A-Za-z0-9_.+\-]", "-", base).lstrip(".-") or "model"
    tag = re.sub(r"[^A-Za-z0-9_.+\-]", "-", profile) if profile else (f"{bits:g}bit" if bits is not None else "JANG")
    return f"{base}-{tag}"
