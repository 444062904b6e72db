"""Build the mlx-lm baseline folder, once, cached under .cache/.

- A model folder (an mlx-lm folder, or a JANG bundle, which mlx_lm.load reads as is) is served as it
  is, except that its floating-point tensors (norms, float16 scales and biases) are cast to the
  serving dtype in a cached copy when they differ: jang-serve's loader does the same cast (float32 on
  CPU, bfloat16 on GPU), so both servers run the very same quantized weights in the same dtype.
- A .gguf: GGUF -> transformers (dequantized) -> save_pretrained -> mlx_lm.convert with the requested
  bits (needs the `test` extra: transformers, torch, mlx-lm).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("JANG_BENCH_CACHE", REPO / ".cache" / "bench"))


def mlx_lm_folder(src: str | Path, bits: int = 4, group_size: int = 64, dtype: str = "float32") -> Path:
    """Return an mlx-lm model folder for `src` (a .gguf file or a model folder) at `bits`.

    A folder is used as is (`bits` does not apply), cast to `dtype` if its float tensors are in
    another one (dtype=None: never cast). For a .gguf, bits=0 keeps full precision.
    """
    src = Path(src)
    if src.is_dir():
        if not (src / "config.json").exists():
            raise FileNotFoundError(f"{src}: not a model folder (no config.json)")
        return cast_folder(src, dtype) if dtype else src
    if src.suffix != ".gguf":
        raise ValueError(f"{src}: expected a .gguf file or a model folder")
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such file")
    tag = f"{src.stem}-mlx-{'q%d-g%d' % (bits, group_size) if bits else 'fp'}-{dtype}"
    out = CACHE / tag
    if (out / "config.json").exists():
        return out
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        hf_dir = Path(tmp) / "hf"
        _gguf_to_hf(src, hf_dir)
        from mlx_lm.convert import convert

        staged = Path(tmp) / "mlx"
        convert(str(hf_dir), str(staged), quantize=bits > 0, q_bits=bits or None,
                q_group_size=group_size if bits else None, dtype=dtype)
        if out.exists():
            shutil.rmtree(out)
        staged.rename(out)  # atomic within CACHE: a half-built folder is never visible
    return out


def _gguf_to_hf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF into an HF safetensors folder with transformers' GGUF reader."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # transformers marks GGUF-loaded models as unserializable; write the dequantized weights ourselves.
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied to the embeddings; safetensors refuses shared tensors
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    tok.save_pretrained(str(out))


def _float_dtypes(folder: Path) -> set[str]:
    import mlx.core as mx

    out = set()
    for f in sorted(folder.glob("*.safetensors")):
        for v in mx.load(str(f)).values():
            if mx.issubdtype(v.dtype, mx.floating):
                out.add(str(v.dtype).rsplit(".", 1)[-1])
    return out


def cast_folder(src: Path, dtype: str) -> Path:
    """`src` itself if all its float tensors are `dtype`, else a cached copy where they are.

    Packed (integer) weights are copied untouched; float16 -> float32 is exact.
    """
    import mlx.core as mx

    src = Path(src)
    if _float_dtypes(src) <= {dtype}:
        return src
    key = hashlib.sha1("|".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}"
                                for f in sorted(src.iterdir()) if f.is_file()).encode()).hexdigest()[:10]
    out = CACHE / f"{src.name}-{dtype}-{key}"
    if (out / "config.json").exists():
        return out
    CACHE.mkdir(parents=True, exist_ok=True)
    target = getattr(mx, dtype)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        staged = Path(tmp) / "model"
        staged.mkdir()
        for f in sorted(src.iterdir()):
            if f.suffix == ".safetensors":
                w = mx.load(str(f))
                w = {k: v.astype(target) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in w.items()}
                mx.save_safetensors(str(staged / f.name), w, metadata={"format": "mlx"})
            elif f.is_file():
                shutil.copy2(f, staged / f.name)
        if out.exists():
            shutil.rmtree(out)
        staged.rename(out)
    return out


def describe_model(folder: str | Path) -> dict:
    """What a model folder holds, for the record: format, bits, group size, float dtypes, size."""
    folder = Path(folder)
    info: dict = {"path": str(folder)}
    if folder.is_file():
        info.update(format=folder.suffix.lstrip("."), size_bytes=folder.stat().st_size)
        return info
    cfg = json.loads((folder / "config.json").read_text()) if (folder / "config.json").exists() else {}
    q = cfg.get("quantization") or cfg.get("quantization_config") or {}
    mods = {k: v for k, v in q.items() if isinstance(v, dict) and "bits" in v}
    info["format"] = "jang" if (folder / "jang_config.json").exists() else ("mlx" if q else "hf")
    info["bits"] = q.get("bits")
    info["group_size"] = q.get("group_size")
    if mods:
        info["module_bits"] = sorted({v["bits"] for v in mods.values()})
    if (folder / "jang_config.json").exists():
        jq = json.loads((folder / "jang_config.json").read_text()).get("quantization", {})
        info.update(profile=jq.get("profile"), method=jq.get("method"), average_bits=jq.get("actual_bits"))
    info["float_dtypes"] = sorted(_float_dtypes(folder))
    info["size_bytes"] = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    return info
