"""Custom kernels with one Python entry point each.

Every op picks its implementation by the default device: CUDA source through `mx.fast.cuda_kernel`,
Metal source through `mx.fast.metal_kernel`, or the pure-MLX reference (the specification, and the
CPU path). Set JANG_KERNELS=reference to force the reference everywhere.

This package imports nothing else of jang-serve.
"""

from .gather import gather_qmm
from .paged import paged_attention_decode, paged_decode_reference, write_kv
from .qmm import qmm, qmm_reference
from .startup import qmm_shapes, warmup

__all__ = ["qmm", "qmm_reference", "paged_attention_decode", "paged_decode_reference", "write_kv",
           "warmup", "qmm_shapes", "gather_qmm"]
