"""Dense weights for the CPU: quantized linears and embeddings dequantized once, at start-up.

MLX's CPU `quantized_matmul` is a scalar loop (~1 GFLOP/s, one pass over the weight per activation
row; bench/results/qmm-cpu.json), while a dense float32 matmul goes through BLAS. For a model whose
dense copy is small (the embedded SmolLM2-135M: 0.54 GB in float32) the CPU decodes faster from the
dequantized weights: the values are exactly the quantized model's, only the memory grows
(bench/results/cpu-dense.json). So on the CPU, when the dense copy fits `EngineConfig.cpu_dense_gb`,
every `QLinear` becomes an `nn.Linear` (`QLinear.dense_twin`) and every `nn.QuantizedEmbedding` (and with it a tied
lm_head) an `nn.Embedding`, in the activation dtype. Stacked MoE experts stay quantized.
"""

from __future__ import annotations

import logging

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from ..kv_pool import available_memory_bytes
from .layers import QLinear

log = logging.getLogger(__name__)

DEFAULT_CPU_DENSE_GB = 2.0


def _candidates(model) -> list[tuple[str, nn.Module]]:
    return [(p, m) for p, m in model.named_modules()
            if isinstance(m, QLinear) or type(m) is nn.QuantizedEmbedding]


def _bytes(found, dtype: mx.Dtype) -> int:
    return sum(m.weight.shape[0] * (m.weight.shape[1] * 32 // m.bits) * dtype.size for _, m in found)


def dense_bytes(model, dtype: mx.Dtype) -> int:
    """Bytes the dense copies of the model's quantized linears / embeddings would take."""
    return _bytes(_candidates(model), dtype)


def _dense(m: nn.Module, dtype: mx.Dtype) -> nn.Module:
    w = mx.dequantize(m.weight, m.scales, m.biases, group_size=m.group_size, bits=m.bits).astype(dtype)
    if type(m) is nn.QuantizedEmbedding:
        out = nn.Embedding(*w.shape)
        out.weight = w
    else:
        out = m.dense_twin(w)  # nn.Linear, or a sharded layer's own dense kind
    out.freeze()
    mx.eval(out.parameters())  # now, one module at a time: no lazy graph holds the packed weights
    return out


def densify(model, dtype: mx.Dtype, max_gb: float, available: int | None = None) -> dict | None:
    """Swap the quantized linears / embeddings for dense ones when their dense copy takes at most
    `max_gb` GB and at most half of `available` bytes of free memory (when given); returns what was
    done ({"modules", "bytes", "dtype"}), or None (nothing to do, or over a limit: the model stays
    as it is)."""
    found = _candidates(model)
    need = _bytes(found, dtype)
    name = str(dtype).removeprefix("mlx.core.")
    if not found or max_gb <= 0:
        return None
    if need > max_gb * 1e9 or (available is not None and need > available / 2):
        why = f"cpu_dense_gb = {max_gb:.2f}" if need > max_gb * 1e9 else f"{available / 1e9:.2f} GB of memory free"
        log.info("CPU: keeping %d quantized layers packed: their dense %s copy would take %.2f GB (%s)",
                 len(found), name, need / 1e9, why)
        return None
    swaps = [(p, _dense(m, dtype)) for p, m in found]
    model.update_modules(tree_unflatten(swaps))
    log.info("CPU: dequantized %d quantized layers to dense %s (%.2f GB), as MLX's CPU quantized "
             "matmul is scalar (cpu_dense_gb = %.2f; 0 keeps them packed)", len(found), name, need / 1e9, max_gb)
    return {"modules": len(found), "bytes": need, "dtype": name}


def densify_for_device(model, dtype: mx.Dtype, cpu_dense_gb: float | None) -> dict | None:
    """`densify` on the CPU backend with the configured budget (None: DEFAULT_CPU_DENSE_GB), within half
    of the memory still free (the KV pool is already allocated); on a GPU, where the quantized kernels
    are the fast path, nothing."""
    if mx.default_device() != mx.cpu:
        return None
    return densify(model, dtype, DEFAULT_CPU_DENSE_GB if cpu_dense_gb is None else cpu_dense_gb,
                   available_memory_bytes())
