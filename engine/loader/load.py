"""load_model: any supported model path -> a ready MLX model, its config and tokenizer.

    "hf"    config.json + model.safetensors or sharded safetensors (fp32 / bf16 / fp16)
    "mlx"   mlx-lm quantized folder (config.json "quantization": global and per-module)
    "jang"  JANG v2 bundle (jang_config.json next to an mlx-style folder)
    "gguf"  a llama.cpp .gguf file (engine.loader.gguf)

Quantized folders: build the float model (lazily, so its random weights are never computed),
swap the quantized modules for QLinear / QuantizedEmbedding / QSwitchLinear with each module's
(bits, group_size), then load the checkpoint strictly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from .dtype import cast_floats, resolve_dtype
from .errors import LoadError
from . import hf
from .hf import load_weights, model_dir, tensor_infos
from .jang import JANG_CONFIG, drop_runtime_ignored, jang_declared, jang_default, read_jang_config
from .mlx_quant import config_default, config_override, plan_quantization, quant_config

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: object  # an engine.models Model (nn.Module)
    config: dict
    tokenizer: object | None  # engine.tokenizer.Tokenizer, None when the folder has none
    quantization: dict | None  # None for float models; else format, bits, group_size, modules
    path: Path
    format: str  # "hf" | "mlx" | "jang" | "gguf"
    dtype: mx.Dtype = mx.float32
    shard: dict | None = None  # load_model(shard=(rank, size)): what this rank holds (shard_model's summary)


def detect_format(path) -> str:
    """"hf", "mlx", "jang" or "gguf" for a model path (reads config files only)."""
    p = Path(path)
    if not p.exists():
        raise LoadError(p, "missing (no such file or directory)")
    if p.is_file():
        if p.suffix.lower() == ".gguf":
            return "gguf"
        raise LoadError(p, "not a model: expected a folder with config.json or a .gguf file")
    if (p / JANG_CONFIG).is_file():
        return "jang"
    if not (p / "config.json").is_file():
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return "gguf"
    cfg = hf.read_config(p)
    return "mlx" if quant_config(cfg, p / "config.json") else "hf"


def read_config(path) -> dict:
    """The HF-style config of a model folder (config.json) or of a .gguf file (from its metadata)."""
    p = Path(path)
    if p.is_file() and p.suffix.lower() == ".gguf":
        from .gguf import read_gguf

        try:
            return read_gguf(p, with_weights=False).config
        except ValueError as e:
            raise LoadError(p, _strip_path(str(e), p)) from None
    return hf.read_config(p)


def _strip_path(msg: str, p: Path) -> str:
    return msg[len(str(p)) + 2:] if msg.startswith(f"{p}: ") else msg


def load_model(path, dtype="auto", shard: tuple[int, int] | None = None) -> LoadedModel:
    """Load a model folder or .gguf file; errors are LoadError naming the file and the problem.
    shard=(rank, size): tensor parallelism, the model comes back cut to that rank's shard (its
    collectives' group attached later) and only the slices it keeps are read from safetensors
    (engine/distributed/shard_load.py); a .gguf file is read whole, then cut."""
    p = Path(path)
    fmt = detect_format(p)
    dt = resolve_dtype(dtype)
    if fmt == "gguf":
        lm = _load_gguf(p if p.is_file() else next(p.glob("*.gguf")), dt)
        if shard is not None:
            from jang_serve.engine.distributed.sharding import shard_model

            log.info("tensor parallel: %s is a GGUF file, read whole, then cut to rank %d of %d", p, *shard)
            lm.shard = shard_model(lm.model, None, *shard)
        return lm
    p = model_dir(p)
    config = read_config(p)
    family_model = _build(config, p / "config.json")
    infos = tensor_infos(p)
    if shard is None:
        weights, files = load_weights(p, infos)
    else:
        from jang_serve.engine.distributed.shard_load import disk_weights, load_sharded, sanitize_lazy

        weights, files = disk_weights(infos)  # nothing read yet: names, shapes, offsets
    qcfg = quant_config(config, p / "config.json")
    if fmt == "jang":
        jc = read_jang_config(p)
        weights = drop_runtime_ignored(weights)
        declared, default = jang_declared(jc, qcfg), jang_default(jc, qcfg)
    else:
        default = config_default(qcfg)

        def declared(path_):
            o = config_override(qcfg, path_)
            return [("config", o)] if o else ([("config", default)] if default and o is None else [])

    model = family_model
    try:
        weights = model.sanitize(weights) if shard is None else sanitize_lazy(model, weights)
    except (KeyError, ValueError, IndexError) as e:
        raise LoadError(p, f"checkpoint tensors do not fit the {config.get('model_type')} model: {e}") from None
    plan = None
    if any(k.endswith(".scales") for k in weights):
        from jang_serve.engine.models.layers import quantize_model

        plan = plan_quantization(model, weights, declared, default, files, p)
        quantize_model(model, plan.spec)
    _check_parameters(model, weights, files, p)
    weights = cast_floats(weights, dt)
    info = None
    if shard is None:
        model.load_weights(list(weights.items()), strict=True)
    else:
        info = load_sharded(model, weights, *shard)
    model.eval()
    mx.eval(model.parameters())
    quant = plan.as_dict(fmt) if plan else None
    return LoadedModel(model, config, _tokenizer(p), quant, p, fmt, dt, info)


def _build(config: dict, cfg_file: Path):
    from jang_serve.engine.models import UnknownModelType, build_model

    if not config.get("model_type"):
        raise LoadError(cfg_file, "no \"model_type\" key: cannot tell which model family this is")
    try:
        return build_model(config)
    except UnknownModelType as e:
        raise LoadError(cfg_file, str(e)) from None
    except (TypeError, ValueError, KeyError) as e:
        raise LoadError(cfg_file, f"bad config for {config['model_type']}: {e}") from None


def _check_parameters(model, weights: dict, files: dict, where: Path) -> None:
    """Every model parameter present with its exact shape, and no stray tensors."""
    want = dict(tree_flatten(model.parameters()))
    missing = sorted(k for k in want if k not in weights)
    if missing:
        more = f" (and {len(missing) - 8} more)" if len(missing) > 8 else ""
        raise LoadError(where, f"missing parameters: {', '.join(missing[:8])}{more}")
    extra = sorted(k for k in weights if k not in want)
    if extra:
        more = f" (and {len(extra) - 8} more)" if len(extra) > 8 else ""
        raise LoadError(files.get(extra[0], where),
                        f"unexpected tensors not in the {model.args.model_type} model: "
                        f"{', '.join(extra[:8])}{more}")
    for k, arr in want.items():
        got = weights[k]
        if tuple(got.shape) != tuple(arr.shape):
            raise LoadError(files.get(k, where), f"mismatched shapes: parameter {k} expected "
                                                 f"{list(arr.shape)} (from config.json), got {list(got.shape)}")


def _tokenizer(p: Path):
    if not (p / "tokenizer.json").is_file():
        return None
    try:
        from jang_serve.engine.tokenizer import Tokenizer
    except ImportError:
        return None
    try:
        return Tokenizer.from_dir(p)
    except ValueError as e:
        raise LoadError(p / "tokenizer.json", f"cannot build the tokenizer: {e}") from None


def _load_gguf(f: Path, dt) -> LoadedModel:
    from .gguf import load_gguf_model

    try:
        model, config, tok = load_gguf_model(f, dtype=dt)
    except LoadError:
        raise
    except ValueError as e:  # GGUFError and friends already name the file
        raise LoadError(f, _strip_path(str(e), f)) from None
    return LoadedModel(model, config, tok, None, f, "gguf", dt)
