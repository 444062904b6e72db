"""Quantized matmul with the neighbouring elementwise work folded in, for decode-sized inputs.

    qmm_fused(x, w, scales, biases, bits, group_size, norm_weight=None, eps=1e-5,
              residual=None, swiglu=False)
      = epilogue(qmm(prologue(x)))
      prologue: mx.fast.rms_norm(x, norm_weight, eps)          when norm_weight is given
      epilogue: silu(y[..., :N/2]) * y[..., N/2:]              when swiglu (w stacks gate over up)
                then + residual                                when residual is given

A decoder layer at one token runs ~14 GPU operations, and at batch 1 MLX's host-side dispatch of
each (~9 us) costs more than the GPU work (kernels/qmm.md, "End to end"). The fused forms cut five
of them per layer: input norm + q/k/v, o_proj + residual, post norm + gate/up + SwiGLU,
down + residual. On CUDA, for 1-4 activation rows, they run as variants of the fused GEMV
(kernels/qmm_cuda.py built with JANG_NORM / JANG_EPI; on Metal its port in kernels/qmm_metal.py,
after a self-test, UNTESTED ON DEVICE): the norm's 1/rms is a per-row scalar, so the
kernel multiplies x by the norm weight as it loads it, sums x^2 alongside, and scales the finished
dot products; SwiGLU teams own matching gate and up rows; the residual is added before the single
rounding to the output dtype. Everywhere else (CPU, more rows, JANG_KERNELS=reference,
JANG_FUSED_GEMV=0) the composition above runs, with `kernels.qmm` for the matmul: the specification.
"""

from __future__ import annotations

import math
import os

import mlx.core as mx

from . import backend, qgemv_tc_cuda, qmm_cuda
from .qmm import GEMV_ROWS, gemv_tc_on, qmm


def fused_on() -> bool:
    return os.environ.get("JANG_FUSED_GEMV", "1").strip() not in ("0", "false", "off")


def _metal():
    from . import qmm_metal

    return qmm_metal


def _kernel_backend() -> str | None:
    """"cuda" or "metal" when a fused kernel may run (the Metal twin after its self-test), else None."""
    if not fused_on():
        return None
    b = backend.for_op("qmm_fused")
    if b == "cuda" or (b == "metal" and _metal().fused_ready(qmm_fused_reference)):
        return b
    return None


def qmm_fused_reference(x, w, scales, biases, bits, group_size, norm_weight=None, eps=1e-5, residual=None,
                        swiglu=False):
    """The composition: the specification of the fused kernels, and their path off CUDA."""
    h = x if norm_weight is None else mx.fast.rms_norm(x, norm_weight, eps)
    y = qmm(h, w, scales, biases, bits, group_size)
    if swiglu:
        g, u = mx.split(y, 2, axis=-1)
        y = g * mx.sigmoid(g) * u
    return y if residual is None else y + residual


def _check(x, w, norm_weight, residual, swiglu):
    n = w.shape[0]
    if swiglu and n % 2:
        raise ValueError(f"qmm_fused: swiglu needs stacked gate and up rows (an even N), got N={n}")
    if norm_weight is not None and norm_weight.shape != (x.shape[-1],):
        raise ValueError(f"qmm_fused: norm_weight must be [{x.shape[-1]}], got {tuple(norm_weight.shape)}")
    n_out = n // 2 if swiglu else n
    if residual is not None and residual.shape != (*x.shape[:-1], n_out):
        raise ValueError(f"qmm_fused: residual must be {(*x.shape[:-1], n_out)}, got {tuple(residual.shape)}")


def kernel_supported(x, w, bits, group_size, norm_weight, residual, swiglu) -> bool:
    rows = math.prod(x.shape[:-1])
    return (rows <= GEMV_ROWS and qmm_cuda.supports(x.reshape(-1, x.shape[-1]), w, bits, group_size)
            and (norm_weight is None or norm_weight.dtype == x.dtype)
            and (residual is None or residual.dtype == x.dtype)
            and not (swiglu and residual is not None))   # no layer needs both; the kernel has one epilogue


_kernels: dict = {}


def _kernel(bits: int, epi: int, norm: bool, eps: float, rope: tuple[int, ...] | None = None):
    """rope: (head_dim, rotated heads[, q heads: also store k and v into the KV pools]) for the RoPE epilogue."""
    bounded = bits in qmm_cuda.BOUNDED_BITS
    key = (bounded, epi, norm, float(eps) if norm else None, rope)
    k = _kernels.get(key)
    if k is None:
        defines, names = qmm_cuda.fused_variant(epi, norm, eps, rope)
        store = "w" if rope and len(rope) > 2 else ""
        tag = f"e{epi}n{int(norm)}{store}{'' if bounded else 'u'}" + (f"_{len(_kernels)}" if norm or rope else "")
        k = _kernels[key] = backend.cuda_kernel(name=f"jang_qgemv_fused_{tag}", input_names=names,
                                                output_names=["y"], source=qmm_cuda.SOURCE,
                                                header=defines + qmm_cuda.header(bits))
    return k


def _tc(x2d, w, scales, bits, group_size) -> bool:
    """Whether the tensor-core GEMV (kernels/qgemv_tc_cuda.py) serves this case (self-tested per template)."""
    return (gemv_tc_on(x2d.shape[0]) and qgemv_tc_cuda.supports(x2d, w, bits, group_size)
            and qgemv_tc_cuda.ready(x2d.dtype, scales.dtype, bits, group_size, x2d.shape[0], fused=True))


def qgemv_fused(x2d, w, scales, biases, bits, group_size, norm_weight=None, eps=1e-5, residual=None,
                swiglu=False):
    """The CUDA kernel: x2d [M<=4, K] -> [M, N or N/2] (the tensor-core GEMV where it serves the case)."""
    if _tc(x2d, w, scales, bits, group_size):
        return qgemv_tc_cuda.qgemv_tc(x2d, w, scales, biases, bits, group_size, norm_weight, eps, residual, swiglu)
    m, k = x2d.shape
    n = w.shape[0]
    cfg = qmm_cuda.default_config(m, n // 2 if swiglu else n, k, bits)
    r, wv = cfg["R"], cfg["W"]
    if swiglu:
        r = max(2, r)                    # R/2 gate rows + R/2 up rows per team
    n_out = n // 2 if swiglu else n
    rows_out = r // 2 if swiglu else r
    blocks = math.ceil(n_out / (rows_out * (4 // wv)))
    epi = 2 if swiglu else 1 if residual is not None else 0
    inputs = [x2d, w, scales, biases] + ([norm_weight] if norm_weight is not None else []) + \
             ([residual] if residual is not None else [])
    return _kernel(bits, epi, norm_weight is not None, eps)(
        inputs=inputs,
        template=[("T", x2d.dtype), ("S", scales.dtype), ("BITS", bits), ("GS", group_size),
                  ("MM", qmm_cuda.rows_bucket(m)), ("R", r), ("W", wv), ("FAST", True), ("PF", False)],
        grid=(blocks * qmm_cuda.THREADS, 1, 1),
        threadgroup=(qmm_cuda.THREADS, 1, 1),
        output_shapes=[(m, n_out)],
        output_dtypes=[x2d.dtype],
    )[0]


def qmm_fused(x, w, scales, biases, bits, group_size, norm_weight=None, eps=1e-5, residual=None,
              swiglu=False):
    """See the module docstring. x [..., K] -> [..., N] (N/2 with swiglu)."""
    _check(x, w, norm_weight, residual, swiglu)
    b = _kernel_backend()
    if b and kernel_supported(x, w, bits, group_size, norm_weight, residual, swiglu):
        # 2-D inputs (the decode path) go as they are: a reshape to the same shape is still a graph node
        lead = x.shape[:-1]
        x2d = x if x.ndim == 2 else x.reshape(-1, x.shape[-1])
        res2d = None if residual is None or residual.ndim == 2 else residual.reshape(x2d.shape[0], -1)
        res2d = residual if res2d is None else res2d
        impl = qgemv_fused if b == "cuda" else _metal().qgemv_fused
        y = impl(x2d, w, scales, biases, bits, group_size, norm_weight, eps, res2d, swiglu)
        return y if x.ndim == 2 else y.reshape(*lead, y.shape[-1])
    return qmm_fused_reference(x, w, scales, biases, bits, group_size, norm_weight, eps, residual, swiglu)


def rope_inv_freq(dims: int, base: float | None, scale: float = 1.0, periods: mx.array | None = None) -> mx.array:
    """float32 [dims/2]: angle of pair j at position p is p * inv_freq[j], as mx.fast.rope computes it
    (base ** (-2j/dims), or 1/periods when given, times the position scale)."""
    if periods is not None:
        inv = 1.0 / periods.astype(mx.float32)
    else:
        inv = mx.power(mx.array(float(base), mx.float32), -mx.arange(0, dims, 2, dtype=mx.float32) / dims)
    return (inv * scale).astype(mx.float32)


def qkv_rope(x, w, scales, biases, bits, group_size, *, n_heads, n_kv, head_dim, positions, inv_freq, rope,
             norm_weight=None, eps=1e-5):
    """q [T, n_heads, hd], k and v [T, n_kv, hd] from a joint q/k/v projection (w stacks q, k, v rows),
    q and k rotated. The composition: qmm_fused(x, norm) -> reshape -> `rope(heads, positions)` (the
    model's RoPE module) on the q and k heads. On CUDA at 1-4 rows: one kernel, the rotation of each
    (j, j + hd/2) row pair applied to the finished sums (positions int32 [T], inv_freq float32 [hd/2])."""
    t = x.shape[0]
    nrot = n_heads + n_kv
    if w.shape[0] != (n_heads + 2 * n_kv) * head_dim:
        raise ValueError(f"qkv_rope: w has {w.shape[0]} rows, expected {(n_heads + 2 * n_kv) * head_dim}")
    b = _kernel_backend()
    if b and rope_kernel_supported(x, w, bits, group_size, head_dim, positions, inv_freq, norm_weight):
        if b == "cuda":
            y = _qgemv_rope(x, w, scales, biases, bits, group_size, norm_weight, eps, positions,
                            inv_freq, head_dim, nrot)
        else:
            y = _metal().qgemv_fused(x, w, scales, biases, bits, group_size, norm_weight, eps,
                                     rope=(positions, inv_freq, head_dim, nrot))
        y = y.reshape(t, n_heads + 2 * n_kv, head_dim)
        return y[:, :n_heads], y[:, n_heads:nrot], y[:, nrot:]
    y = qmm_fused(x, w, scales, biases, bits, group_size, norm_weight=norm_weight, eps=eps)
    y = y.reshape(t, n_heads + 2 * n_kv, head_dim)
    qk = rope(y[:, :nrot], positions)
    return qk[:, :n_heads], qk[:, n_heads:], y[:, nrot:]


def rope_kernel_supported(x, w, bits, group_size, head_dim, positions, inv_freq, norm_weight) -> bool:
    """The fused q/k/v + RoPE kernel takes these inputs (2-D x, even head dim, int32 positions, one rate per pair)."""
    return (x.ndim == 2 and head_dim % 2 == 0 and positions.dtype == mx.int32 and inv_freq.shape == (head_dim // 2,)
            and kernel_supported(x, w, bits, group_size, norm_weight, None, False))


def _qgemv_rope(x2d, w, scales, biases, bits, group_size, norm_weight, eps, positions, inv_freq, head_dim, nrot,
                store=None):
    """store: (k_pool, v_pool, blocks, offsets, q heads) to also write k and v into the pools (kernels/qkv_store.py;
    the scalar kernel only)."""
    if store is None and _tc(x2d, w, scales, bits, group_size):
        return qgemv_tc_cuda.qgemv_tc(x2d, w, scales, biases, bits, group_size, norm_weight, eps,
                                      rope=(positions, inv_freq, head_dim, nrot))
    m, k = x2d.shape
    n = w.shape[0]
    cfg = qmm_cuda.default_config(m, n, k, bits)
    r, wv = max(2, cfg["R"]), cfg["W"]
    blocks = math.ceil((n // 2) / ((r // 2) * (4 // wv)))
    inputs = [x2d, w, scales, biases] + ([norm_weight] if norm_weight is not None else []) + [positions, inv_freq] + \
        ([] if store is None else list(store[:4]))
    rope = (head_dim, nrot) if store is None else (head_dim, nrot, store[4])
    return _kernel(bits, 3, norm_weight is not None, eps, rope)(
        inputs=inputs,
        template=[("T", x2d.dtype), ("S", scales.dtype), ("BITS", bits), ("GS", group_size),
                  ("MM", qmm_cuda.rows_bucket(m)), ("R", r), ("W", wv), ("FAST", True), ("PF", False)],
        grid=(blocks * qmm_cuda.THREADS, 1, 1),
        threadgroup=(qmm_cuda.THREADS, 1, 1),
        output_shapes=[(m, n)],
        output_dtypes=[x2d.dtype],
    )[0]
