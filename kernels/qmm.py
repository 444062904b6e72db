"""Quantized matmul entry point: y = x @ dequant(w).T for MLX's affine packed weights.

  x [..., K] (bf16 / fp16 / fp32), w uint32 [N, K*bits/32], scales / biases [N, K/group_size]
  bits 2, 3, 4, 5, 6, 8; group_size 32, 64, 128.

Paths by backend (kernels/backend.py) and by activation rows M = prod(x.shape[:-1]):
  reference    mx.quantized_matmul (the specification)
  cpu, M>=16 (M>=4 for weights of <= 8M elements)  dequantize, then the dense float32 matmul (BLAS):
               MLX's CPU quantized_matmul does ~1 GFLOP/s, dense float32 with OpenBLAS ~45
               (bench/results/qmm-cpu.json)
  cpu, else    the reference
  cuda, 2-8    tensor-core GEMV (kernels/qgemv_tc_cuda.py) at 2/4/8 bits where it supports the case and
               passed its self-test (JANG_GEMV_TC=0: off; =all: also 1 row), else the fused dequant + GEMV
               kernel (kernels/qmm_cuda.py) up to 4 rows, else mx.quantized_matmul
  cuda, M=1    fused dequant + GEMV kernel (kernels/qmm_cuda.py)
  cuda, 16<=M<DEQUANT_ROWS (17 at 8 bits), 2/4/8 bits  tiled dequant + tensor-core GEMM
               (kernels/qgemm_cuda.py; kernels/qgemm_v1_cuda.py with JANG_QGEMM_IMPL=v1; N % 128 == 0),
               checked once per template against the reference at first use (off on a mismatch);
               JANG_QGEMM=0 turns it off
  cuda, M in RS_ROWS (RS_ROWS_8BIT at 8 bits), 2/4/8 bits, scales in x's dtype  register-operand
               warpgroup GEMM (kernels/qgemm_rs_cuda.py: Hopper, sm_90a through NVRTC), self-tested at first
               use like the next one; JANG_QGEMM_RS=0 turns it off, JANG_QGEMM_RS_ROWS=64-256 sets the
               ranges
  cuda, WG_MIN_ROWS<=M<=WG_MAX_ROWS, 2/4/8 bits, scales in x's dtype  warpgroup (wgmma) GEMM
               (kernels/qgemm_wg_cuda.py: Hopper, compiled for sm_90a with NVRTC), after its self-test at
               first use (a failure, e.g. no NVRTC or not a Hopper GPU, falls back to the routes here);
               JANG_QGEMM_WG=0 turns it off (and the register-operand GEMM)
  cuda, else   mx.quantized_matmul below DEQUANT_ROWS rows (DEQUANT_ROWS_8BIT at 8 bits), else
               dequantize once to the activation dtype and run the dense (cuBLAS) matmul
  The path is chosen once per (shapes, dtypes, bits, group) and cached; thresholds from
  bench/results/kernels-h100.json.
  metal, M<=8  the Metal port of the GEMV kernel (kernels/qmm_metal.py), self-tested at first use
"""

from __future__ import annotations

import os

import mlx.core as mx

from . import backend

# From the H100 run (bench/results/kernels-h100.json): the fused GEMV wins up to 4 rows; from 5 rows
# MLX's tensor-core quantized_matmul is faster; dequantize + dense matmul only pays for large prefills.
GEMV_ROWS = 4
# The tiled tensor-core GEMM (kernels/qgemm_cuda.py) from 16 rows at 2/4 bits (H100, 16 rows: 30-47 us
# queued vs 31-57 for mx.quantized_matmul, and 39-45 vs 72-225 us of GPU time; kernels-gemm-h100.json,
# qgemm-gputime-h100.json); at 8 bits from 17 (at 16 rows mx.quantized_matmul queues faster: 19.5 vs 30.6 us).
# The tensor-core GEMV (kernels/qgemv_tc_cuda.py: 2/4/8 bits, bf16/fp16, up to 8 rows, loads through a 4-stage
# cp.async ring) serves 2-8 rows where it supports the case (H100, bench/results/kernels-gemv-pipe-h100.json:
# 4 rows, 4-bit: 23.8-26.2 us vs 46.4-48.4 for the scalar GEMV and 128-132 for mx.quantized_matmul; 2 rows:
# 21.0-23.2 vs 25.7-28.0; 8 rows: 24.0-29.0 vs 29.1-32.5 for mx.quantized_matmul). At one row it is no
# faster than the scalar kernel (22.9 vs 20.7 us at 14336x4096, 4-bit), which keeps 1 row and the fused
# decode GEMVs. JANG_GEMV_TC=all: the tensor-core kernel for 1-8 rows (and the fused variants); =0: never.
GEMV_TC_MIN_ROWS = int(os.environ.get("JANG_GEMV_TC_MIN_ROWS", "2"))   # (the env var overrides)
# The fused decode GEMVs (kernels/qmm_fused.py) likewise (JANG_GEMV_TC_FUSED_MIN_ROWS overrides).
FUSED_TC_MIN_ROWS = int(os.environ.get("JANG_GEMV_TC_FUSED_MIN_ROWS", "2"))
GEMV_TC_MAX_ROWS = 8
QGEMM_MIN_ROWS = 16
QGEMM_MIN_ROWS_8BIT = 17
QGEMM_BITS = (2, 4, 8)    # JANG_QGEMM_BITS=2,4 (say) narrows it
# Which tiled GEMM: "v3" (kernels/qgemm3_cuda.py: weights as the mma's A operand, 64 rows of x per block,
# K multiples of 128), "v2" (kernels/qgemm_cuda.py: x as A, 16-128 rows per block, K multiples of 64) or "v1"
# (kernels/qgemm_v1_cuda.py). H100, 64 rows, 4 bits: v3 43-63 us against v2 56-89 and the bf16 matmul 49-91
# (qgemm3-h100.json). With the default, a shape v3 does not take (K % 128 != 0) goes to v2 (qgemm_for).
QGEMM_IMPL = "v3"
DEQUANT_ROWS = 192
# The weight-stationary GEMM (kernels/qgemm3_cuda.py) serves up to this many rows (dequantize + cuBLAS
# from there: 116 vs 124 us at 256 rows of 14336x4096, bench/results/qgemm3-h100.json), at 8 bits from 17
# like v2: mx.quantized_matmul is faster on 4096x4096 at 32-64 rows (18.8 vs 25.0 us at 64) but slower on
# the 8-bit lm_head, and the decode step at 64 sequences measured 10.3 ms with qgemm3 on every 8-bit
# matrix against 13.0-13.7 ms with 8 bits on mx.quantized_matmul below 65 rows (e2e route probe,
# bench/results/e2e-qgemm3-h100.json).
QGEMM3_MAX_ROWS = 192
QGEMM3_MIN_ROWS_8BIT = 17
# The warpgroup GEMM serves WG_MIN_ROWS..WG_MAX_ROWS rows (JANG_QGEMM_WG_MIN_ROWS / _MAX_ROWS override).
# H100, bench/results/qgemm-wg-h100.json, against the route before it (qgemm3 below 192 rows, dequantize +
# cuBLAS from there): 96-256 rows 1.1-2.0x at every measured shape (e.g. 14336x4096 4-bit at 128 rows 52.1
# vs 68.0 us, 256 rows 79.7 vs 112.3); 64 rows: qgemm3 is as fast or faster (45.5 vs 58.0 us at 4096x14336,
# 64.1 vs 92.0 at 28672x4096); 384-768 rows: dequantize + cuBLAS is (129.5 vs 147.2 us at 384 of 14336x4096).
WG_MIN_ROWS = 96
WG_MAX_ROWS = 256
# The register-operand GEMM takes these row ranges from the warpgroup GEMM and qgemm3. H100,
# bench/results/qgemm-rs-h100.json, one run: at 2/4 bits 1.02-1.38x the route before it at every measured shape
# and row count from 64 to 256 but one within noise (its time grows with the row tile; the warpgroup GEMM's
# jumps past 128 rows, where it takes two m64 tiles per warpgroup); at 8 bits the kernels alone are level
# below 129 rows (0.92-1.18x), so those keep their route, and the route is 0.99-1.11x from there.
RS_ROWS = ((64, 256),)
RS_ROWS_8BIT = ((129, 256),)
DEQUANT_ROWS_8BIT = 384   # 8-bit: mx.quantized_matmul beats dequantize + matmul up to at least 256 rows
# CPU: from this many rows, dequantize + dense matmul beats mx.quantized_matmul for every SmolLM2 shape
# (bench/qmm_cpu.py: small matrices win from 4 rows, the 49152x576 tied lm_head only from ~16).
CPU_DEQUANT_ROWS = 16
# ... and weights of at most CPU_SMALL_MAX_ELEMENTS already from CPU_SMALL_DEQUANT_ROWS rows: MLX's CPU
# quantized_matmul makes one pass over the weight per row (a prefix hit's 8 new tokens spent 873 of
# 954 ms in it; 405 ms on this route, bench/results/engine-cpu-jang4l-hit-profile.json). Large weights
# (the tied 49152x576 lm_head: dequantizing costs ~0.9 s) keep the 16-row threshold.
CPU_SMALL_DEQUANT_ROWS = CPU_SMALL_DEQUANT_ROWS_SHIPPED = 4
CPU_SMALL_MAX_ELEMENTS = 8_000_000


def qgemm_on() -> bool:
    return os.environ.get("JANG_QGEMM", "1").strip() not in ("0", "false", "off")


def qgemm_impl():
    """The tiled GEMM module serving the "qgemm" route (QGEMM_IMPL, or JANG_QGEMM_IMPL=v1|v2|v3)."""
    from . import qgemm3_cuda, qgemm_cuda, qgemm_v1_cuda

    name = os.environ.get("JANG_QGEMM_IMPL", "").strip() or QGEMM_IMPL
    impls = {"v1": qgemm_v1_cuda, "v2": qgemm_cuda, "v3": qgemm3_cuda}
    if name not in impls:
        raise ValueError(f"JANG_QGEMM_IMPL must be v1, v2 or v3, got {name!r}")
    return impls[name]


def qgemm_min_rows(bits: int) -> int:
    """Rows from which the tiled GEMM serves (below: the GEMVs or mx.quantized_matmul)."""
    from . import qgemm3_cuda

    if bits == 8:
        if qgemm_impl() is qgemm3_cuda:
            return int(os.environ.get("JANG_QGEMM3_MIN_ROWS_8BIT", QGEMM3_MIN_ROWS_8BIT))
        return QGEMM_MIN_ROWS_8BIT
    return QGEMM_MIN_ROWS


def qgemm_max_rows(bits: int) -> int:
    """Rows up to which the tiled GEMM serves (from there, dequantize + dense matmul)."""
    from . import qgemm3_cuda

    if qgemm_impl() is qgemm3_cuda:
        return int(os.environ.get("JANG_QGEMM3_MAX_ROWS", QGEMM3_MAX_ROWS))
    return DEQUANT_ROWS


def qgemm_for(x, w, bits: int, group_size: int):
    """The tiled GEMM module that serves this weight (qgemm_impl(); where the default v3 does not take the
    shape, e.g. K not a multiple of 128, v2), or None."""
    from . import qgemm_cuda

    impl = qgemm_impl()
    if impl.supports(x, w, bits, group_size):
        return impl
    if not os.environ.get("JANG_QGEMM_IMPL", "").strip() and impl is not qgemm_cuda \
            and qgemm_cuda.supports(x, w, bits, group_size):
        return qgemm_cuda
    return None


def wg_rows() -> tuple[int, int]:
    """(first, last) row count the warpgroup GEMM serves; (0, -1) with JANG_QGEMM_WG=0."""
    if os.environ.get("JANG_QGEMM_WG", "1").strip() in ("0", "false", "off"):
        return 0, -1
    return (int(os.environ.get("JANG_QGEMM_WG_MIN_ROWS", WG_MIN_ROWS)),
            int(os.environ.get("JANG_QGEMM_WG_MAX_ROWS", WG_MAX_ROWS)))


def rs_rows(bits: int) -> tuple[tuple[int, int], ...]:
    """The row ranges the register-operand GEMM serves at these bits; () when it or the warpgroup GEMMs are
    off (JANG_QGEMM_RS=0, JANG_QGEMM_WG=0). JANG_QGEMM_RS_ROWS="64-96,129-256" sets them for every width."""
    off = ("0", "false", "off")
    if os.environ.get("JANG_QGEMM_RS", "1").strip() in off or os.environ.get("JANG_QGEMM_WG", "1").strip() in off:
        return ()
    env = os.environ.get("JANG_QGEMM_RS_ROWS", "").strip()
    if env:
        try:
            return tuple((int(a), int(b)) for a, b in (r.split("-") for r in env.split(",")))
        except ValueError:
            raise ValueError(f"JANG_QGEMM_RS_ROWS must look like 64-96,129-256, got {env!r}") from None
    return RS_ROWS_8BIT if bits == 8 else RS_ROWS


def rs_serves(m: int, bits: int) -> bool:
    """m rows fall in one of the register-operand GEMM's row ranges at these bits (rs_rows)."""
    return any(a <= m <= b for a, b in rs_rows(bits))


def gemv_tc_mode() -> str:
    """JANG_GEMV_TC: "off" (0), "all" (the tensor-core GEMV for 1-8 rows and the fused variants) or the
    default "wide" (2-8 rows: GEMV_TC_MIN_ROWS..GEMV_TC_MAX_ROWS)."""
    v = os.environ.get("JANG_GEMV_TC", "").strip().lower()
    return "off" if v in ("0", "false", "off") else "all" if v in ("1", "all", "on", "true") else "wide"


def gemv_tc_on(m: int = 1) -> bool:
    """Whether the fused decode GEMVs (1-4 rows) use the tensor-core kernel for m rows: always with
    JANG_GEMV_TC=all, from FUSED_TC_MIN_ROWS rows by default, never with JANG_GEMV_TC=0."""
    mode = gemv_tc_mode()
    return mode == "all" or (mode == "wide" and m >= FUSED_TC_MIN_ROWS)


def gemv_kind(m: int, x, w, bits: int, group_size: int) -> str:
    """"tc" where the tensor-core GEMV serves m rows (JANG_GEMV_TC and the case: gemv_tc_mode, supports),
    "scalar" where the scalar GEMV does (up to GEMV_ROWS), else "none"."""
    from . import qgemv_tc_cuda, qmm_cuda

    mode = gemv_tc_mode()
    if (mode == "all" or (mode == "wide" and m >= GEMV_TC_MIN_ROWS)) and m <= GEMV_TC_MAX_ROWS \
            and qgemv_tc_cuda.supports(x.reshape(m, x.shape[-1]), w, bits, group_size):
        return "tc"
    return "scalar" if m <= GEMV_ROWS and qmm_cuda.supports(x, w, bits, group_size) else "none"


def gemv_plan(m: int, x, w, scales, bits: int, group_size: int):
    """The prepared GEMV call for m rows (the tensor-core kernel after its self-test, else the scalar one up
    to GEMV_ROWS), or None: the reference serves."""
    from . import qgemv_tc_cuda, qmm_cuda

    k, n = x.shape[-1], w.shape[0]
    kind = gemv_kind(m, x, w, bits, group_size)
    if kind == "tc" and qgemv_tc_cuda.ready(x.dtype, scales.dtype, bits, group_size, m, n, k):
        return qgemv_tc_cuda.plan(m, n, k, x.dtype, bits, group_size)
    if m <= GEMV_ROWS and qmm_cuda.supports(x, w, bits, group_size):
        return qmm_cuda.plan(m, n, k, x.dtype, bits, group_size)
    return None


def dequant_on() -> bool:
    """JANG_DEQUANT=0: mx.dequantize before cuBLAS instead of kernels/dequant_cuda (A/B)."""
    return os.environ.get("JANG_DEQUANT", "1") != "0"


def qgemm_bits() -> tuple[int, ...]:
    env = os.environ.get("JANG_QGEMM_BITS", "").strip()
    return tuple(int(b) for b in env.split(",") if b.strip()) if env else QGEMM_BITS


def qmm_reference(x, w, scales, biases, bits, group_size):
    return mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=group_size, bits=bits)


def qmm_dequant_matmul(x, w, scales, biases, bits, group_size):
    """Same math as the reference: dequantize the weight, then a dense matmul (in float32 on the CPU,
    where MLX has no fast half-precision matmul), result in x's dtype."""
    wd = mx.dequantize(w, scales, biases, group_size=group_size, bits=bits).astype(mx.float32)
    return (x.astype(mx.float32) @ wd.T).astype(x.dtype)


def _check(x, w, scales, biases, bits, group_size):
    if bits not in (2, 3, 4, 5, 6, 8):
        raise ValueError(f"qmm: bits must be 2, 3, 4, 5, 6 or 8, got {bits}")
    if group_size not in (32, 64, 128):
        raise ValueError(f"qmm: group_size must be 32, 64 or 128, got {group_size}")
    if w.ndim != 2 or w.dtype != mx.uint32:
        raise ValueError(f"qmm: w must be a 2-D uint32 array, got {w.dtype} {tuple(w.shape)}")
    k = w.shape[1] * 32 // bits
    if x.shape[-1] != k:
        raise ValueError(f"qmm: x has {x.shape[-1]} input features but w packs {k} at {bits} bits")
    if scales.shape != (w.shape[0], k // group_size) or biases.shape != scales.shape:
        raise ValueError(f"qmm: scales/biases must be {(w.shape[0], k // group_size)}, got "
                         f"{tuple(scales.shape)} / {tuple(biases.shape)}")


def _cuda_route(m: int, x, w, bits: int, group_size: int, sdtype=None, wg: bool = True, rs: bool = True) -> str:
    """Which CUDA path serves m rows (thresholds from bench/results/kernels-h100.json, qgemm-wg-h100.json,
    qgemm-rs-h100.json)."""
    from . import qgemm_rs_cuda, qgemm_wg_cuda

    if gemv_kind(m, x, w, bits, group_size) != "none":
        return "gemv"
    if rs and rs_serves(m, bits) and qgemm_rs_cuda.supports(x, w, bits, group_size, sdtype):
        return "rs"
    lo, hi = wg_rows()
    if wg and lo <= m <= hi and qgemm_wg_cuda.supports(x, w, bits, group_size, sdtype):
        return "wg"
    half = x.dtype in (mx.bfloat16, mx.float16)
    if qgemm_min_rows(bits) <= m < qgemm_max_rows(bits) and bits in qgemm_bits() \
            and qgemm_on() \
            and qgemm_for(x, w, bits, group_size) is not None:
        return "qgemm"
    if half and m >= (DEQUANT_ROWS_8BIT if bits == 8 else DEQUANT_ROWS):
        return "dequant"
    return "reference"


_routes: dict[tuple, tuple] = {}   # key -> (route, prepared kernel call or None)


def cpu_dequant_route(m: int, weight_elements: int) -> bool:
    """Whether the CPU path dequantizes and runs BLAS for m rows of a weight of this many elements."""
    if m >= CPU_DEQUANT_ROWS:
        return True
    return m >= CPU_SMALL_DEQUANT_ROWS and weight_elements <= CPU_SMALL_MAX_ELEMENTS


def _key(b, x, w, scales, biases, bits, group_size) -> tuple:
    return (b, x.shape, w.shape, scales.shape, biases.shape, x.dtype, w.dtype, scales.dtype, bits, group_size,
            os.environ.get("JANG_QGEMM"), os.environ.get("JANG_QGEMM_BITS"), os.environ.get("JANG_QGEMM_SPLIT"),
            os.environ.get("JANG_QGEMM_IMPL"), os.environ.get("JANG_GEMV_TC"), os.environ.get("JANG_QGEMM3_MAX_ROWS"),
            os.environ.get("JANG_QGEMM3_MIN_ROWS_8BIT"), os.environ.get("JANG_QGEMM_WG"),
            os.environ.get("JANG_QGEMM_WG_MIN_ROWS"), os.environ.get("JANG_QGEMM_WG_MAX_ROWS"),
            os.environ.get("JANG_QGEMM_RS"), os.environ.get("JANG_QGEMM_RS_ROWS"))


def _cuda_plan(key, m, k, x, w, scales, bits, group_size) -> tuple:
    """(route, prepared kernel call or None) for this CUDA case, picked and cached on first use."""
    route, fn = _routes.get(key, (None, None))
    if route is not None:
        return route, fn
    from . import qgemm_cuda, qgemm_rs_cuda, qgemm_wg_cuda

    route = _cuda_route(m, x, w, bits, group_size, scales.dtype)
    if route == "rs" and not qgemm_rs_cuda.ready(x.dtype, scales.dtype, bits, group_size):
        route = _cuda_route(m, x, w, bits, group_size, scales.dtype, rs=False)
    if route == "wg" and not qgemm_wg_cuda.ready(x.dtype, scales.dtype, bits, group_size):
        route = _cuda_route(m, x, w, bits, group_size, scales.dtype, wg=False, rs=False)
    impl = qgemm_for(x, w, bits, group_size) if route == "qgemm" else None
    if route == "qgemm" and not impl.ready(x.dtype, scales.dtype, bits, group_size, m):
        route = "reference"
    fn = None
    if route == "gemv":
        fn = gemv_plan(m, x, w, scales, bits, group_size)
        route = "gemv" if fn is not None else "reference"   # 5-8 rows, tensor-core self-test failed
    elif route == "qgemm" and impl is qgemm_cuda:
        fn = qgemm_cuda.plan(m, w.shape[0], k, x.dtype, bits, group_size, scales.itemsize)
    elif route == "qgemm":
        fn = impl.plan(m, w.shape[0], k, x.dtype, bits, group_size)
    elif route == "wg":
        fn = qgemm_wg_cuda.plan(m, w.shape[0], k, x.dtype, bits, group_size)
    elif route == "rs":
        fn = qgemm_rs_cuda.plan(m, w.shape[0], k, x.dtype, bits, group_size)
    _routes[key] = (route, fn)
    return route, fn


_partial_plans: dict[tuple, object] = {}


def partials_plan(x2d: mx.array, w: mx.array, scales: mx.array, biases: mx.array, bits: int, group_size: int):
    """f(x2d, w, scales, biases) -> float32 partial sums [S, M, N] over S slices of K (y = their sum, rounded to
    x's dtype) on the CUDA route qmm takes for this case, or None where that route has no such form (the GEMVs,
    cuBLAS, mx.quantized_matmul, qgemm v1/v2, off CUDA). Epilogue kernels sum them (kernels/gemm_epilogue.py)."""
    b = backend.for_op("qmm")
    if b != "cuda" or x2d.ndim != 2:
        return None
    key = _key(b, x2d, w, scales, biases, bits, group_size)
    if key in _partial_plans:
        return _partial_plans[key]
    _check(x2d, w, scales, biases, bits, group_size)
    from . import qgemm3_cuda, qgemm_rs_cuda, qgemm_wg_cuda

    m, k = x2d.shape
    route, _ = _cuda_plan(key, m, k, x2d, w, scales, bits, group_size)
    mod = {"rs": qgemm_rs_cuda, "wg": qgemm_wg_cuda}.get(route)
    if route == "qgemm" and qgemm_for(x2d, w, bits, group_size) is qgemm3_cuda:
        mod = qgemm3_cuda
    plan = mod.plan_partials(m, w.shape[0], k, x2d.dtype, bits, group_size) if mod is not None else None
    _partial_plans[key] = plan
    return plan


def qmm(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, bits: int, group_size: int) -> mx.array:
    """x: [..., K] activations; w: [N, K*bits/32] uint32 packed; scales/biases: [N, K/group_size].

    Returns [..., N] in x's dtype."""
    b = backend.for_op("qmm")
    key = _key(b, x, w, scales, biases, bits, group_size)
    route, fn = _routes.get(key, (None, None))
    if route is None:  # first call with these shapes: check the arguments once and pick the path
        _check(x, w, scales, biases, bits, group_size)
    lead = x.shape[:-1]
    m = 1
    for d in lead:
        m *= d
    k = x.shape[-1]
    if b == "reference":
        if cpu_dequant_route(m, w.shape[0] * k) and backend.cpu_fast_paths():
            return qmm_dequant_matmul(x, w, scales, biases, bits, group_size)
        return qmm_reference(x, w, scales, biases, bits, group_size)
    if b == "cuda":
        route, fn = _cuda_plan(key, m, k, x, w, scales, bits, group_size)
        if fn is not None:
            return fn(x.reshape(m, k), w, scales, biases).reshape(*lead, w.shape[0])
        if route == "dequant":
            from . import dequant_cuda

            if dequant_cuda.supports(w, bits, group_size, x.dtype) and dequant_on() \
                    and dequant_cuda.ready(bits, group_size, x.dtype, scales.dtype):
                wd = dequant_cuda.dequantize(w, scales, biases, bits, group_size, x.dtype)
            else:
                wd = mx.dequantize(w, scales, biases, group_size=group_size, bits=bits).astype(x.dtype)
            return x @ wd.T
        return qmm_reference(x, w, scales, biases, bits, group_size)
    if b == "metal":
        from . import qmm_metal

        if m <= qmm_metal.MAX_ROWS and qmm_metal.supports(x, w, bits, group_size) and qmm_metal.ready():
            y = qmm_metal.qgemv(x.reshape(m, k), w, scales, biases, bits, group_size)
            return y.reshape(*lead, w.shape[0])
    return qmm_reference(x, w, scales, biases, bits, group_size)
