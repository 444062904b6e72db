"""Build the mlx-lm baseline folder for a GGUF model, once, cached under .cache/.

GGUF -> transformers (dequantized) -> save_pretrained -> mlx_lm.convert with the requested bits.
Only runs when `--baseline mlx-lm` is asked for; needs the `test` extra (transformers, torch, mlx-lm).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("JANG_BENCH_CACHE", REPO / ".cache" / "bench"))


def mlx_lm_folder(src: str | Path, bits: int = 4, group_size: int = 64, dtype: str = "float32") -> Path:
    """Return an mlx-lm model folder for `src` (a .gguf file or an HF/mlx folder) at `bits`.

    A folder that already holds an mlx-lm config is returned as is. bits=0 keeps full precision.
    """
    src = Path(src)
    if src.is_dir():
        if (src / "config.json").exists():
            return src
        raise FileNotFoundError(f"{src}: not a model folder (no config.json)")
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
