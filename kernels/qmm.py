"""Quantized matmul entry point: y = x @ dequant(w).T for MLX's affine packed weights."""

import mlx.core as mx


def qmm(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, bits: int, group_size: int) -> mx.array:
    """x: [..., K] activations; w: [N, K*bits/32] uint32 packed; scales/biases: [N, K/group_size].

    Returns [..., N]. The reference is `mx.quantized_matmul` (transpose=True).
    """
    return mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=group_size, bits=bits)
