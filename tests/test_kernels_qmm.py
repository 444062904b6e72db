"""kernels.qmm on the CPU: the reference path, input checks, backend selection, and a NumPy port of
the CUDA GEMV's per-unit algorithm (bit-stream fields, in-place masking with pre-scaled activations,
per-group scale * sum(x*q) + bias * sum(x)) checked against mx.dequantize / mx.quantized_matmul."""

import importlib
import numpy as np
import pytest

import mlx.core as mx

from jang_serve.kernels import backend, qmm, qmm_reference
from jang_serve.kernels import qmm_cuda


def _quant(n, k, bits, gs, seed=0):
    mx.random.seed(seed)
    w = mx.random.normal((n, k)) * 0.1
    return mx.quantize(w, group_size=gs, bits=bits)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("gs", [32, 64, 128])
def test_reference_path_matches_quantized_matmul(bits, gs):
    wq, s, b = _quant(48, 256, bits, gs)
    x = mx.random.normal((3, 256))
    y = qmm(x, wq, s, b, bits, gs)
    ref = mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=gs, bits=bits)
    assert y.shape == (3, 48)
    assert mx.allclose(y, ref, atol=1e-5, rtol=1e-5).item()
    # and against an explicit dequantized float matmul
    dense = x @ mx.dequantize(wq, s, b, group_size=gs, bits=bits).T
    assert mx.allclose(y, dense, atol=1e-3, rtol=1e-3).item()


def test_leading_dims_are_kept():
    wq, s, b = _quant(16, 128, 4, 64)
    x = mx.random.normal((2, 3, 128))
    assert qmm(x, wq, s, b, 4, 64).shape == (2, 3, 16)


def test_bad_inputs_name_the_problem():
    wq, s, b = _quant(16, 128, 4, 64)
    with pytest.raises(ValueError, match="bits"):
        qmm(mx.zeros((1, 128)), wq, s, b, 7, 64)
    with pytest.raises(ValueError, match="group_size"):
        qmm(mx.zeros((1, 128)), wq, s, b, 4, 16)
    with pytest.raises(ValueError, match="input features"):
        qmm(mx.zeros((1, 64)), wq, s, b, 4, 64)
    with pytest.raises(ValueError, match="scales"):
        qmm(mx.zeros((1, 128)), wq, s[:, :1], b, 4, 64)


def test_backend_is_reference_on_cpu_and_env_forces_it(monkeypatch):
    assert backend.current() == "reference"      # the default device here is the CPU
    monkeypatch.setenv("JANG_KERNELS", "reference")
    assert backend.for_op("qmm") == "reference"
    monkeypatch.setenv("JANG_KERNELS", "bogus")
    with pytest.raises(ValueError, match="JANG_KERNELS"):
        backend.current()


def _gemv_like_cuda(x, wq, s, b, bits, gs, fast):
    """NumPy port of kernels/qmm_cuda.py for one activation row (same units, fields and sums)."""
    x = np.asarray(x, np.float64)
    words = np.asarray(wq).astype(np.uint64)
    s = np.asarray(s, np.float64)
    b = np.asarray(b, np.float64)
    n, kw = words.shape
    k = kw * 32 // bits
    pow2 = bits in (2, 4, 8)
    vals = 128 // bits if pow2 else 32
    nwords = vals * bits // 32
    ng = vals // gs if vals > gs else 1
    gv = vals // ng
    vpw, mask = 32 // bits, (1 << bits) - 1
    y = np.zeros(n)
    for r in range(n):
        acc = 0.0
        for u in range(k // vals):
            wv = [int(v) for v in words[r, u * nwords:(u + 1) * nwords]]
            g0 = u * vals // gs
            for gi in range(ng):
                p = xs = 0.0
                nosub = fast and bits in (2, 4)
                if nosub:    # float32 sums, as the kernel: the 2^23 magic costs bits, the test sees how many
                    p, xs2 = np.float32(0), np.float32(0)
                for v in range(gi * gv, (gi + 1) * gv):
                    xv = x[u * vals + v]
                    xs += xv
                    if nosub:
                        # one shift per PER fields to bit 23 - bits * per; f = 2^23 + q * 2^pos; x pre-scaled by 2^-pos
                        per = 2 if bits == 4 else 4
                        pw = v % vpw
                        base = 23 - bits * per
                        sh = base - bits * per * (pw // per)
                        sw = (wv[v // vpw] << sh if sh >= 0 else wv[v // vpw] >> -sh) & 0xFFFFFFFF
                        pos = base + bits * (pw % per)
                        f = np.uint32((sw & (mask << pos)) | 0x4B000000).view(np.float32)
                        xp = np.float32(np.float32(xv) * np.float32(2.0 ** -pos))
                        xs2 = np.float32(xs2 + xp)
                        p = np.float32(float(xp) * float(f) + float(p))        # one rounding: an FMA
                    elif fast and pow2:
                        word = wv[v // vpw]
                        pw = v % vpw
                        hw = word >> 16 if pw >= vpw // 2 else word
                        j = pw % (vpw // 2)
                        masked = hw & (mask << (bits * j))
                        f = np.float32(np.uint32(masked | 0x4B000000).view(np.float32)) - np.float32(8388608.0)
                        p += (xv * 2.0 ** (-bits * j)) * float(f)
                    else:
                        bit = v * bits
                        stream = wv[bit // 32] | ((wv[bit // 32 + 1] << 32) if bit // 32 + 1 < nwords else 0)
                        p += xv * ((stream >> (bit % 32)) & mask)
                if nosub:
                    p = float(np.float32(-8388608.0 * float(xs2) + float(p)))
                acc += s[r, g0 + gi] * p + b[r, g0 + gi] * xs
        y[r] = acc
    return y


@pytest.mark.parametrize("bits,gs,fast", [(2, 32, True), (4, 64, True), (8, 128, True), (3, 64, False),
                                          (5, 32, False), (6, 128, False), (4, 32, False), (2, 128, True),
                                          (4, 128, True)])
def test_cuda_gemv_algorithm_in_numpy(bits, gs, fast):
    wq, s, b = _quant(3, 256, bits, gs, seed=bits)
    x = mx.random.normal((256,)) * mx.exp(2 * mx.random.normal((256,)))    # magnitudes over ~e^+-6
    y = _gemv_like_cuda(x, wq, s, b, bits, gs, fast)
    ref = np.asarray(mx.quantized_matmul(x[None], wq, s, b, transpose=True, group_size=gs, bits=bits))[0]
    if fast and bits in (2, 4):
        # NOSUB's float32 group sums give ~8 bits to the magic: ~1e-5 of the output's scale (bf16 keeps 8 bits)
        assert np.abs(y - ref).max() <= 1e-4 * np.abs(ref).max()
    else:
        assert np.allclose(y, ref, rtol=1e-4, atol=1e-4)


def test_cuda_launch_config_and_support_rules():
    cfg = qmm_cuda.default_config(1, 14336, 4096, 4)
    assert cfg == {"R": 8, "W": 1, "FAST": True, "PF": False}
    assert qmm_cuda.default_config(1, 4096, 14336, 4)["W"] == 2
    assert [qmm_cuda.rows_bucket(m) for m in (1, 2, 3, 4, 5, 8)] == [1, 2, 4, 4, 8, 8]
    wq, _, _ = _quant(8, 256, 4, 64)
    assert qmm_cuda.supports(mx.zeros((1, 256), dtype=mx.bfloat16), wq, 4, 64)
    wq3, _, _ = _quant(8, 192, 3, 64)
    assert not qmm_cuda.supports(mx.zeros((1, 192), dtype=mx.bfloat16), wq3, 3, 64)   # K % 128


def test_cuda_gemv_builds_with_launch_bounds_at_2_4_8_bits_only():
    # MLX's JIT writes `__global__ void name(` right after the header: the bounded header must end by redefining it.
    for bits in (2, 4, 8):
        tail = qmm_cuda.header(bits).rstrip().splitlines()[-2:]
        assert tail == ["#undef __global__",
                        f"#define __global__ __location__(global) __launch_bounds__({qmm_cuda.THREADS}, 4)"]
    for bits in (3, 5, 6):
        assert "__launch_bounds__" not in qmm_cuda.header(bits)
    # the scale/bias tie is compiled for the 2/4/8-bit (bounded) builds only
    assert "if constexpr (POW2) wv[r][0] = jang::tie(" in qmm_cuda.SOURCE


def test_reference_function_is_the_spec():
    wq, s, b = _quant(8, 128, 6, 64)
    x = mx.random.normal((2, 128))
    assert mx.array_equal(qmm_reference(x, wq, s, b, 6, 64),
                          mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=64, bits=6)).item()


def test_metal_self_test_failure_falls_back_with_a_log_line(caplog, monkeypatch):
    """No Metal here: building the Metal kernel fails, so the guard must disable it, log why, and
    leave qmm on the reference."""
    from jang_serve.kernels import metal_common, qmm_metal

    monkeypatch.setattr(metal_common, "_results", {})
    monkeypatch.setattr(backend, "_disabled", set())
    with caplog.at_level("WARNING", logger="jang_serve.kernels"):
        assert qmm_metal.ready() is False
    assert ("metal", "qmm") in backend.disabled()
    assert "metal qmm kernel disabled" in caplog.text
    monkeypatch.setattr(backend, "current", lambda: "metal")
    assert backend.for_op("qmm") == "reference"
    wq, s, b = _quant(8, 128, 4, 64)
    x = mx.random.normal((1, 128))
    assert mx.allclose(qmm(x, wq, s, b, 4, 64), qmm_reference(x, wq, s, b, 4, 64)).item()


def test_qmm_shapes_finds_each_distinct_quantized_linear():
    import mlx.nn as nn

    from jang_serve.kernels import qmm_shapes

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.QuantizedLinear(128, 64, group_size=64, bits=4)
            self.b = nn.QuantizedLinear(128, 64, group_size=64, bits=4)    # same variant as a
            self.c = nn.QuantizedLinear(256, 32, group_size=32, bits=8)
            self.d = nn.Linear(8, 8)

    shapes = qmm_shapes(Tiny())
    assert sorted((s["bits"], s["group_size"], s["k"]) for s in shapes) == [(4, 64, 128), (8, 32, 256)]
    assert all(s["op"] == "qmm" for s in shapes)


def test_gather_qmm_picks_each_tokens_expert():
    from jang_serve.kernels import gather_qmm

    mx.random.seed(5)
    e, n, k = 4, 16, 128
    wq, s, b = mx.quantize(mx.random.normal((e, n, k)) * 0.1, group_size=64, bits=4)
    x = mx.random.normal((3, 1, k))
    idx = mx.array([2, 0, 3])
    y = gather_qmm(x, wq, s, b, idx, 4, 64)
    assert y.shape == (3, 1, n)
    for t in range(3):
        e_t = int(idx[t].item())
        ref = qmm_reference(x[t], wq[e_t], s[e_t], b[e_t], 4, 64)
        assert mx.allclose(y[t], ref, atol=1e-5).item()
    with pytest.raises(ValueError, match="input features"):
        gather_qmm(mx.zeros((3, 1, 64)), wq, s, b, idx, 4, 64)


def test_float32_activations_stay_on_the_reference():
    wq, _, _ = _quant(8, 256, 4, 64)
    assert not qmm_cuda.supports(mx.zeros((1, 256), dtype=mx.float32), wq, 4, 64)


@pytest.mark.parametrize("rows", [1, 3, 4, 16, 65])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_cpu_route_matches_reference(rows, bits, monkeypatch):
    """On the CPU, from CPU_SMALL_DEQUANT_ROWS rows (this weight is small) qmm dequantizes and runs the
    dense matmul (same math, float rounding apart); below that it is the reference itself;
    JANG_KERNELS=reference forces it."""
    qmm_mod = importlib.import_module("jang_serve.kernels.qmm")  # the module (the package exports the function)

    monkeypatch.delenv("JANG_KERNELS", raising=False)
    w = mx.random.normal((96, 128), key=mx.random.key(bits)) * 0.05
    q, s, b = mx.quantize(w, group_size=64, bits=bits)
    x = mx.random.normal((rows, 128), key=mx.random.key(rows))
    ref = qmm_mod.qmm_reference(x, q, s, b, bits, 64)
    got = qmm_mod.qmm(x, q, s, b, bits, 64)
    assert got.dtype == x.dtype and got.shape == ref.shape
    assert float(mx.abs(got - ref).max()) < 1e-4 * (1 + float(mx.abs(ref).max()))
    fast = qmm_mod.qmm_dequant_matmul(x, q, s, b, bits, 64)
    expect_fast = rows >= qmm_mod.CPU_SMALL_DEQUANT_ROWS
    assert mx.array_equal(got, fast).item() == expect_fast or mx.array_equal(fast, ref).item()
    monkeypatch.setenv("JANG_KERNELS", "reference")
    assert mx.array_equal(qmm_mod.qmm(x, q, s, b, bits, 64), ref).item()


def test_cpu_route_keeps_large_weights_on_the_reference_below_16_rows():
    qmm_mod = importlib.import_module("jang_serve.kernels.qmm")
    big = qmm_mod.CPU_SMALL_MAX_ELEMENTS + 1  # e.g. a tied 49152x576 lm_head (28M elements)
    assert [qmm_mod.cpu_dequant_route(m, 49152 * 576) for m in (1, 4, 8, 15, 16)] == [False] * 4 + [True]
    assert [qmm_mod.cpu_dequant_route(m, big) for m in (4, 16)] == [False, True]
    assert [qmm_mod.cpu_dequant_route(m, 576 * 1536) for m in (1, 3, 4, 8)] == [False, False, True, True]
