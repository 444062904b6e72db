"""Weight loaders: Hugging Face safetensors folders, mlx-lm quantized folders, JANG v2 bundles and
GGUF files, all into the models of `engine.models`.

    load_model(path, dtype="auto") -> LoadedModel(model, config, tokenizer, quantization, path, format)
    detect_format(path) -> "hf" | "mlx" | "jang" | "gguf"
    read_config(path) -> dict                            config.json, or a .gguf file's metadata as a config
    iter_tensors(path) -> Iterator[(name, mx.array)]     one tensor at a time (streaming conversion)
    tensor_infos(path) -> {name: TensorInfo(dtype, shape, file)}   headers only
    LoadError: every failure, naming the file and the problem
"""

from .dtype import resolve_dtype
from .errors import LoadError
from .hf import iter_tensors, tensor_infos, weight_files
from .load import LoadedModel, detect_format, load_model, read_config
from .mlx_quant import infer_from_shapes

__all__ = [
    "LoadError", "LoadedModel", "detect_format", "infer_from_shapes", "iter_tensors", "load_model",
    "read_config", "resolve_dtype", "tensor_infos", "weight_files",
]
