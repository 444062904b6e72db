"""Expert-gathered quantized matmul for MoE layers: y[i] = x[lhs[i]] @ dequant(w[rhs[i]]).T.

`gather_qmm` is the one entry point the MoE layers call; its specification (and the CPU path) is
`mx.gather_qmm(..., transpose=True)`, with the same arguments and broadcasting:
  x [..., M, K]; w uint32 [E, N, K*bits/32]; scales / biases [E, N, K/group_size];
  rhs_indices [...] pick the expert of each batch entry, lhs_indices [...] (optional) the batch
  entry of x; without lhs_indices x's batch dims broadcast against rhs_indices.
  Output [*broadcast(batch), M, N] in x's dtype.

Paths (kernels/backend.py picks the backend; JANG_KERNELS=reference forces the reference):
  reference         mx.gather_qmm
  cuda / metal      the gathered fused GEMV (kernels/gather_cuda.py, kernels/gather_metal.py) when
                    M == 1 (one activation row per entry: what the MoE layers pass, sorted or not),
                    bf16/fp16 activations, K % 128 == 0, and `kernel_wins(pairs, experts, N, K,
                    sorted)` (measured: bench/results/kernels-gather-h100.json, kernels/gather.md):
                      large experts (N*K >= 8M, Mixtral-like): 1 to 256 pairs;
                      small experts (Qwen3-MoE-like): sorted pairs with >= 4 per expert, up to 1024;
                    mx.gather_qmm otherwise. The Metal twin runs only after its start-up self-test
                    passed.
The path and the launch are chosen once per (shapes, dtypes, bits, group, sorted) and cached; the
index lists the kernel reads (the x row and the expert of each entry) are flat views of the
arguments, or a constant built once when x's batch broadcasts against rhs_indices.
"""

from __future__ import annotations

import mlx.core as mx

from . import backend

# Where the fused kernel serves (bench/results/kernels-gather-h100.json, kernels/gather.md). Large
# experts: faster than mx.gather_qmm at every measured count, 2-256 (token, expert) pairs (1.3-3.3x
# alone; the expert MLP 1.9x at 1 and 8 tokens, 2.9x at 64). Small experts: alone the kernel is
# faster too, but inside the expert MLP (gate, up, down back to back) it measured slower at 1 token
# (70 vs 43 us) and even at 8; faster at 64 tokens x top-8 over 128 experts (689 vs 998 us), where
# sorted pairs average 4 per expert and blocks take 4 pairs of one expert each.
LARGE_EXPERT = 8_000_000     # N * K elements of one expert
LARGE_MAX_PAIRS = 256        # largest count measured (Mixtral-like, 128 tokens x top-2)
SMALL_MIN_PER_EXPERT = 4     # sorted pairs per expert on average
SMALL_MAX_PAIRS = 1024       # largest count measured (Qwen3-MoE-like, 128 tokens x top-8)


def kernel_wins(pairs: int, experts: int, n: int, k: int, sorted_indices: bool) -> bool:
    """Whether the fused gathered kernel serves this many (token, expert) pairs (see above)."""
    if pairs < 1:
        return False
    if n * k >= LARGE_EXPERT:
        return pairs <= LARGE_MAX_PAIRS
    return bool(sorted_indices) and SMALL_MIN_PER_EXPERT * experts <= pairs <= SMALL_MAX_PAIRS

_INT_TYPES = (mx.int32, mx.uint32, mx.int64, mx.uint64, mx.int16, mx.uint16, mx.int8, mx.uint8)


def gather_qmm_reference(x, w, scales, biases, rhs_indices, bits, group_size, lhs_indices=None,
                         sorted_indices=False):
    return mx.gather_qmm(x, w, scales, biases, lhs_indices=lhs_indices, rhs_indices=rhs_indices,
                         transpose=True, group_size=group_size, bits=bits, sorted_indices=sorted_indices)


def _check(x, w, scales, biases, rhs, lhs, bits, group_size) -> tuple[int, ...]:
    """Validate the arguments; returns the broadcast batch shape of the output."""
    if bits not in (2, 3, 4, 5, 6, 8):
        raise ValueError(f"gather_qmm: bits must be 2, 3, 4, 5, 6 or 8, got {bits}")
    if group_size not in (32, 64, 128):
        raise ValueError(f"gather_qmm: group_size must be 32, 64 or 128, got {group_size}")
    if w.ndim != 3 or w.dtype != mx.uint32:
        raise ValueError(f"gather_qmm: w must be [experts, N, packed K] uint32, got {w.dtype} {tuple(w.shape)}")
    k = w.shape[-1] * 32 // bits
    if x.ndim < 2:
        raise ValueError(f"gather_qmm: x must be [..., M, K], got shape {tuple(x.shape)}")
    if x.shape[-1] != k:
        raise ValueError(f"gather_qmm: x has {x.shape[-1]} input features but w packs {k} at {bits} bits")
    want = (w.shape[0], w.shape[1], k // group_size)
    if tuple(scales.shape) != want or tuple(biases.shape) != want:
        raise ValueError(f"gather_qmm: scales/biases must be {want}, got {tuple(scales.shape)} / "
                         f"{tuple(biases.shape)}")
    for name, idx in (("rhs_indices", rhs), ("lhs_indices", lhs)):
        if idx is not None and idx.dtype not in _INT_TYPES:
            raise ValueError(f"gather_qmm: {name} must be an integer array, got {idx.dtype}")
    left = tuple(lhs.shape) if lhs is not None else tuple(x.shape[:-2])
    try:
        return tuple(mx.broadcast_shapes(left, tuple(rhs.shape)))
    except ValueError:
        what = "lhs_indices" if lhs is not None else "x's batch dims"
        raise ValueError(f"gather_qmm: {what} {left} do not broadcast with rhs_indices {tuple(rhs.shape)}") from None


def _flat_index(idx: mx.array, batch: tuple[int, ...]) -> mx.array:
    """idx broadcast to the output batch shape, flattened, as int32 or uint32 (the kernel reads either)."""
    if idx.dtype not in (mx.int32, mx.uint32):
        idx = idx.astype(mx.int32)
    if tuple(idx.shape) != batch:
        idx = mx.broadcast_to(idx, batch)
    return idx.reshape(-1)


class _Plan:
    """The chosen path for one argument signature, with everything shape-only computed once."""

    def __init__(self, route, fn=None, batch=(), xi_const=None, rows=0, n=0, k=0):
        self.route, self.fn, self.batch = route, fn, batch
        self.xi_const, self.rows, self.n, self.k = xi_const, rows, n, k

    def __call__(self, x, w, scales, biases, rhs, lhs):
        xi = self.xi_const if lhs is None else _flat_index(lhs, self.batch)
        ei = _flat_index(rhs, self.batch)
        y = self.fn(x.reshape(self.rows, self.k), w, scales, biases, xi, ei)
        return y.reshape(*self.batch, 1, self.n)


def _kernel_plan(b, x, w, rhs, lhs, batch, bits, group_size, sorted_indices):
    """A plan for the fused kernel on backend b, or None when the reference should run."""
    if x.shape[-2] != 1:
        return None       # several activation rows per entry: a GEMM case, MLX's kernel
    entries = 1
    for d in batch:
        entries *= d
    k, n = x.shape[-1], w.shape[1]
    if not kernel_wins(entries, w.shape[0], n, k, sorted_indices):
        return None
    if b == "cuda":
        from . import gather_cuda as impl
    else:
        from . import gather_metal as impl
        if not impl.ready():
            return None
    if not impl.supports(x, w, bits, group_size):
        return None
    rows = 1
    for d in x.shape[:-1]:
        rows *= d
    xi_const = None
    if lhs is None:   # x's batch broadcasts against rhs: entry -> x row depends on shapes only
        xb = tuple(x.shape[:-2])
        xi_const = mx.broadcast_to(mx.arange(rows, dtype=mx.int32).reshape(xb), batch).reshape(-1)
        mx.eval(xi_const)
    fn = impl.plan(entries, n, k, x.dtype, bits, group_size, bool(sorted_indices), w.shape[0])
    return _Plan("kernel", fn, batch, xi_const, rows, n, k)


_plans: dict[tuple, _Plan] = {}


def gather_qmm(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, rhs_indices: mx.array,
               bits: int, group_size: int, lhs_indices: mx.array | None = None,
               sorted_indices: bool = False) -> mx.array:
    """x [..., M, K]; w uint32 [E, N, K*bits/32]; scales/biases [E, N, K/group_size];
    rhs_indices pick the expert of each batch entry. Returns [..., M, N] (see mx.gather_qmm)."""
    b = backend.for_op("gather_qmm")
    lhs = lhs_indices
    key = (b, x.shape, x.dtype, w.shape, scales.shape, scales.dtype, biases.shape, rhs_indices.shape,
           rhs_indices.dtype, None if lhs is None else (lhs.shape, lhs.dtype), bits, group_size,
           bool(sorted_indices))
    plan = _plans.get(key)
    if plan is None:   # first call with this signature: check once and pick the path
        batch = _check(x, w, scales, biases, rhs_indices, lhs, bits, group_size)
        plan = None
        if b in ("cuda", "metal"):
            plan = _kernel_plan(b, x, w, rhs_indices, lhs, batch, bits, group_size, sorted_indices)
        plan = plan or _Plan("reference")
        _plans[key] = plan
    if plan.route == "kernel":
        return plan(x, w, scales, biases, rhs_indices, lhs)
    return gather_qmm_reference(x, w, scales, biases, rhs_indices, bits, group_size, lhs, sorted_indices)



def warmup_spec(spec: dict, dtype, b: str) -> int:
    """Compile ahead every kernel variant gather_qmm may pick for stacked experts of this shape
    (spec: n, k, bits, group_size[, experts, scale_dtype]), on tiny inputs; returns the number of
    launches. Templates depend on the shape only through the launch configuration (one entry or
    four per block; W from N and K), so a 2-expert weight of one tile and K = 512 stands in for the
    real one. MLX's own gather_qmm kernels (unsorted few pairs, sorted many) are compiled too."""
    bits, gs, n = spec["bits"], spec["group_size"], spec["n"]
    sdt = spec.get("scale_dtype", dtype)
    if b == "metal":
        from . import gather_metal
        gather_metal.ready()
        return 0
    if b != "cuda" or spec.get("k", 128) % 128:
        return 0
    from . import gather_cuda

    k, calls = 512, 0
    for entries, srt in ((1, False), (8, True)):        # G = 1 and G = 4 (8 pairs over 2 experts)
        cfg = gather_cuda.default_config(entries, n, spec["k"], bits, srt, 2)
        rows = cfg["R"] * (4 // cfg["W"])
        w = mx.zeros((2, rows, k * bits // 32), dtype=mx.uint32)
        s = mx.ones((2, rows, k // gs), dtype=sdt)
        idx = mx.zeros((entries,), dtype=mx.uint32)
        mx.eval(gather_cuda.gather_qgemv(mx.zeros((entries, k), dtype=dtype), w, s, s, idx.astype(mx.int32), idx,
                                         bits, gs, srt, **cfg))
        calls += 1
    w = mx.zeros((2, 64, k * bits // 32), dtype=mx.uint32)
    s = mx.ones((2, 64, k // gs), dtype=sdt)
    for entries, srt in ((2, False), (SMALL_MAX_PAIRS * 2, True)):   # MLX's kernels (small weights: reference)
        x = mx.zeros((entries, 1, k), dtype=dtype)
        mx.eval(gather_qmm_reference(x, w, s, s, mx.zeros((entries,), dtype=mx.uint32), bits, gs,
                                     sorted_indices=srt))
        calls += 1
    return calls
