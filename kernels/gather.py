"""Expert-gathered quantized matmul for MoE layers: y[i] = x[lhs[i]] @ dequant(w[rhs[i]]).T.

`gather_qmm` is the one entry point the MoE layers call. Today every backend runs the reference,
mx.gather_qmm: a gathered variant of the CUDA GEMV (one expert index per block) is planned but
not yet written or measured, so no untested path is switched on.
"""

from __future__ import annotations

import mlx.core as mx


def gather_qmm(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, rhs_indices: mx.array,
               bits: int, group_size: int, lhs_indices: mx.array | None = None,
               sorted_indices: bool = False) -> mx.array:
    """x [..., M, K]; w uint32 [E, N, K*bits/32]; scales/biases [E, N, K/group_size];
    rhs_indices pick the expert of each batch entry. Returns [..., M, N] (see mx.gather_qmm)."""
    if w.ndim != 3 or w.dtype != mx.uint32:
        raise ValueError(f"gather_qmm: w must be [experts, N, packed K] uint32, got {w.dtype} {tuple(w.shape)}")
    k = w.shape[-1] * 32 // bits
    if x.shape[-1] != k:
        raise ValueError(f"gather_qmm: x has {x.shape[-1]} input features but w packs {k} at {bits} bits")
    return mx.gather_qmm(x, w, scales, biases, lhs_indices=lhs_indices, rhs_indices=rhs_indices,
                         transpose=True, group_size=group_size, bits=bits, sorted_indices=sorted_indices)
