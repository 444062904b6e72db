"""Which float dtype a loaded model runs in, and casting checkpoint tensors to it."""

from __future__ import annotations

import mlx.core as mx

_NAMES = {
    "float32": mx.float32, "fp32": mx.float32, "f32": mx.float32,
    "bfloat16": mx.bfloat16, "bf16": mx.bfloat16,
    "float16": mx.float16, "fp16": mx.float16, "f16": mx.float16, "half": mx.float16,
}


def resolve_dtype(dtype="auto") -> mx.Dtype:
    """"auto" -> float32 on CPU (MLX's quantized matmuls are much slower in half precision there),
    bfloat16 on a GPU. Also takes an mx.Dtype or a name like "bf16"."""
    if isinstance(dtype, mx.Dtype):
        if not mx.issubdtype(dtype, mx.floating):
            raise ValueError(f"model dtype must be a float type, got {dtype}")
        return dtype
    if dtype is None or dtype == "auto":
        return mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16
    try:
        return _NAMES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16") from None


def cast_floats(weights: dict, dtype: mx.Dtype) -> dict:
    """Cast float tensors (weights, norms, quantization scales/biases) to `dtype`; packed integer
    weights stay as they are."""
    return {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) and v.dtype != dtype else v
            for k, v in weights.items()}
