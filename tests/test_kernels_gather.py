"""kernels.gather_qmm on the CPU: the reference path with the shapes the MoE layers pass (sorted and
unsorted, broadcast x, explicit lhs_indices), argument errors, JANG_KERNELS, the Metal guard, the
warm-up entries for stacked experts, and a NumPy port of the gathered kernel's block / entry /
expert-offset mapping (kernels/gather_cuda.py) run on flat buffers and checked against mx.gather_qmm."""

import numpy as np
import pytest

import mlx.core as mx
import mlx.nn as nn

from jang_serve.kernels import backend, gather_cuda, gather_qmm
from jang_serve.kernels import gather as gather_mod
from jang_serve.kernels.gather import gather_qmm_reference


def _experts(e, n, k, bits, gs, seed=0):
    mx.random.seed(seed)
    return mx.quantize(mx.random.normal((e, n, k)) * 0.1, group_size=gs, bits=bits)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("gs", [32, 64, 128])
def test_reference_path_matches_per_expert_quantized_matmul(bits, gs):
    wq, s, b = _experts(4, 24, 128, bits, gs, seed=bits)
    x = mx.random.normal((5, 1, 128))
    idx = mx.array([3, 0, 3, 1, 2], dtype=mx.uint32)
    y = gather_qmm(x, wq, s, b, idx, bits, gs)
    assert y.shape == (5, 1, 24)
    for i, e in enumerate([3, 0, 3, 1, 2]):
        ref = mx.quantized_matmul(x[i], wq[e], s[e], b[e], transpose=True, group_size=gs, bits=bits)
        assert mx.allclose(y[i], ref, atol=1e-5, rtol=1e-5).item()


def test_moe_layer_shapes_unsorted_sorted_and_lhs():
    """SwitchGLU passes x [T,1,1,D] with indices [T,k] (unsorted) or x [T*k,1,D] with the flat
    sorted indices; mx.gather_qmm's lhs_indices form must work as well."""
    wq, s, b = _experts(6, 32, 256, 4, 64, seed=1)
    t, k = 3, 2
    x = mx.random.normal((t, 256))
    inds = mx.array([[5, 1], [0, 5], [2, 3]], dtype=mx.uint32)
    y = gather_qmm(mx.expand_dims(x, (1, 2)), wq, s, b, inds, 4, 64)
    assert y.shape == (t, k, 1, 32)
    flat = inds.reshape(-1)
    order = mx.argsort(flat)
    ys = gather_qmm(x[order // k][:, None, :], wq, s, b, flat[order], 4, 64, sorted_indices=True)
    assert ys.shape == (t * k, 1, 32)
    assert mx.allclose(ys[mx.argsort(order)][:, 0].reshape(t, k, 32), y[:, :, 0], atol=1e-5).item()
    yl = gather_qmm(x[:, None, :], wq, s, b, inds, 4, 64, lhs_indices=mx.array([[0, 0], [1, 1], [2, 2]]))
    assert mx.allclose(yl, y, atol=1e-5).item()
    assert gather_mod._plans and all(p.route == "reference" for p in gather_mod._plans.values())


def test_bad_arguments_name_the_problem():
    wq, s, b = _experts(2, 16, 128, 4, 64)
    x, idx = mx.zeros((3, 1, 128)), mx.array([0, 1, 1])
    with pytest.raises(ValueError, match="bits"):
        gather_qmm(x, wq, s, b, idx, 7, 64)
    with pytest.raises(ValueError, match="group_size"):
        gather_qmm(x, wq, s, b, idx, 4, 16)
    with pytest.raises(ValueError, match=r"\[experts, N, packed K\]"):
        gather_qmm(x, wq[0], s[0], b[0], idx, 4, 64)
    with pytest.raises(ValueError, match="input features"):
        gather_qmm(mx.zeros((3, 1, 64)), wq, s, b, idx, 4, 64)
    with pytest.raises(ValueError, match="scales/biases"):
        gather_qmm(x, wq, s[:, :, :1], b, idx, 4, 64)
    with pytest.raises(ValueError, match="integer"):
        gather_qmm(x, wq, s, b, idx.astype(mx.float32), 4, 64)
    with pytest.raises(ValueError, match="do not broadcast"):
        gather_qmm(x, wq, s, b, mx.array([0, 1]), 4, 64)
    with pytest.raises(ValueError, match=r"\[\.\.\., M, K\]"):
        gather_qmm(mx.zeros((128,)), wq, s, b, idx, 4, 64)


def test_backend_reference_on_cpu_and_env_forces_it(monkeypatch):
    monkeypatch.delenv("JANG_KERNELS", raising=False)
    assert backend.for_op("gather_qmm") == "reference"
    monkeypatch.setattr(backend, "_gpu_backend", lambda: "cuda")
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.gpu))
    assert backend.for_op("gather_qmm") == "cuda"
    monkeypatch.setenv("JANG_KERNELS", "reference")
    assert backend.for_op("gather_qmm") == "reference"


def test_reference_function_is_the_spec():
    wq, s, b = _experts(3, 8, 128, 6, 32)
    x, idx = mx.random.normal((2, 1, 128)), mx.array([2, 0])
    assert mx.array_equal(gather_qmm_reference(x, wq, s, b, idx, 6, 32),
                          mx.gather_qmm(x, wq, s, b, rhs_indices=idx, transpose=True, group_size=32,
                                        bits=6)).item()


# ---- NumPy port of kernels/gather_cuda.py: grid, chunk passes, expert offsets, flat addressing ----

def _fields(words, bits, k):
    """Values 0..k-1 of a little-endian bit stream of `bits`-bit fields (as the kernel's field())."""
    w = words.astype(np.uint64)
    bit = np.arange(k) * bits
    lo = w[bit // 32] >> (bit % 32).astype(np.uint64)
    nxt = np.minimum(bit // 32 + 1, len(w) - 1)
    hi = np.where((bit % 32) + bits > 32, w[nxt] << (32 - bit % 32).astype(np.uint64), 0)
    return ((lo | hi) & ((1 << bits) - 1)).astype(np.float64)


def _gather_like_cuda(x2d, wq, s, b, xi, ei, bits, gs, G, R, W):
    """Every block (chunk, tile) and team of the kernel, reading flat buffers at its offsets."""
    e_n, n, kw = wq.shape
    k = kw * 32 // bits
    ngr = k // gs
    wf, sf, bf = (np.asarray(a).reshape(-1) for a in (wq, s, b))
    xf = np.asarray(x2d, np.float64).reshape(-1)
    nx = x2d.shape[0]
    xi, ei = np.asarray(xi).astype(np.int64), np.asarray(ei).astype(np.int64)
    nb = len(ei)
    teams = 4 // W
    grid_x, grid_y = gather_cuda._launch(nb, n, dict(G=G, R=R, W=W))[0][:2]
    y = np.full(nb * n, np.nan)
    writes = np.zeros(nb * n, int)
    for bx in range(grid_x // gather_cuda.THREADS):
        c0 = bx * G
        ex = [min(max(ei[min(c0 + j, nb - 1)], 0), e_n - 1) for j in range(G)]
        xr = [min(max(xi[min(c0 + j, nb - 1)], 0), nx - 1) for j in range(G)]
        todo = (1 << min(G, nb - c0)) - 1
        while todo:
            f = (todo & -todo).bit_length() - 1
            e = ex[f]
            act = sum(1 << j for j in range(G) if (todo >> j) & 1 and ex[j] == e)
            todo &= ~act
            rows = [xr[j] if (act >> j) & 1 else xr[f] for j in range(G)]
            for by in range(grid_y):
                for team in range(teams):
                    row0 = (by * teams + team) * R
                    for r in range(R):
                        nn_ = e * n + min(row0 + r, n - 1)         # expert offset + feature
                        q = _fields(wf[nn_ * kw:(nn_ + 1) * kw], bits, k).reshape(ngr, gs)
                        sc = sf[nn_ * ngr:(nn_ + 1) * ngr].astype(np.float64)
                        bi = bf[nn_ * ngr:(nn_ + 1) * ngr].astype(np.float64)
                        for m in range(G):
                            xv = xf[rows[m] * k:(rows[m] + 1) * k].reshape(ngr, gs)
                            acc = float((sc * (xv * q).sum(1) + bi * xv.sum(1)).sum())
                            if (act >> m) & 1 and row0 + r < n:
                                y[(c0 + m) * n + row0 + r] = acc
                                writes[(c0 + m) * n + row0 + r] += 1
    return y.reshape(nb, n), writes


@pytest.mark.parametrize("bits,gs,G,R,W,idx,sort", [
    (4, 64, 1, 8, 1, [[5, 1], [0, 5], [2, 3]], False),          # switch's unsorted form, top-2
    (3, 32, 1, 8, 2, [[1, 0, 4, 2]], False),                     # one token, top-4, W=2
    (2, 32, 8, 2, 1, [0, 0, 0, 1, 3, 3, 4, 4, 4, 4, 5], True),   # sorted: chunks of 8 cross experts
    (8, 128, 4, 4, 2, [1, 1, 2, 2, 2, 5], True),                 # last chunk partial
    (6, 64, 2, 4, 1, [3, 0, 3], False),                          # G>1 on unsorted entries: more passes
])
def test_gathered_kernel_mapping_in_numpy(bits, gs, G, R, W, idx, sort):
    n, k = 37, 256                                               # N not a multiple of the tile
    wq, s, b = _experts(6, n, k, bits, gs, seed=bits + G)
    inds = mx.array(idx, dtype=mx.uint32)
    if inds.ndim == 2:   # unsorted: x [T,1,1,K] broadcast against [T,k]
        t = inds.shape[0]
        x = mx.random.normal((t, 1, 1, k))
        ref = mx.gather_qmm(x, wq, s, b, rhs_indices=inds, transpose=True, group_size=gs, bits=bits)
        batch = tuple(inds.shape)
        xi = mx.broadcast_to(mx.arange(t).reshape(t, 1), batch).reshape(-1)
    else:                # sorted: one x row per entry
        x = mx.random.normal((inds.size, 1, k))
        ref = mx.gather_qmm(x, wq, s, b, rhs_indices=inds, transpose=True, group_size=gs, bits=bits,
                            sorted_indices=sort)
        xi = mx.arange(inds.size)
    x2d = x.reshape(-1, k)
    y, writes = _gather_like_cuda(x2d, wq, s, b, xi, inds.reshape(-1), bits, gs, G, R, W)
    assert (writes == 1).all()                                   # every output written exactly once
    assert np.allclose(y, np.asarray(ref).reshape(y.shape), rtol=1e-4, atol=1e-4)


def test_gathered_kernel_clamps_out_of_range_indices_in_numpy():
    wq, s, b = _experts(3, 8, 128, 4, 64)
    x2d = mx.random.normal((2, 128))
    y, _ = _gather_like_cuda(x2d, wq, s, b, mx.array([0, 7]), mx.array([9, -1]), 4, 64, 1, 8, 1)
    want = [mx.quantized_matmul(x2d[0], wq[2], s[2], b[2], transpose=True, group_size=64, bits=4),
            mx.quantized_matmul(x2d[1], wq[0], s[0], b[0], transpose=True, group_size=64, bits=4)]
    assert np.allclose(y, np.stack([np.asarray(v) for v in want]), atol=1e-4)


def test_launch_config_and_support_rules():
    assert gather_cuda.default_config(2, 14336, 4096, 4, False) == {"G": 1, "R": 4, "W": 1, "FAST": True}
    assert gather_cuda.default_config(8, 4096, 14336, 4, False)["W"] == 2      # long K, narrow N
    assert gather_cuda.default_config(8, 2048, 768, 4, False)["W"] == 1        # short K: 24 units
    assert [gather_cuda.default_config(m, 768, 2048, 4, True)["G"] for m in (1, 3, 4, 64)] == [1, 1, 4, 4]
    # with the expert count: 4 pairs per block only from 4 sorted pairs per expert on average
    assert [gather_cuda.default_config(m, 768, 2048, 4, True, 128)["G"] for m in (64, 256, 512)] == [1, 1, 4]
    assert gather_cuda.default_config(512, 768, 2048, 4, False, 128)["G"] == 1
    (gx, gy, gz), tg = gather_cuda._launch(16, 14336, dict(G=1, R=8, W=1))
    assert (gx, gy, gz, tg) == (16 * 128, 448, 1, (128, 1, 1))
    assert gather_cuda._launch(13, 768, dict(G=4, R=4, W=2))[0] == (4 * 128, 96, 1)
    wq, _, _ = _experts(2, 8, 256, 4, 64)
    assert gather_cuda.supports(mx.zeros((1, 256), dtype=mx.bfloat16), wq, 4, 64)
    assert not gather_cuda.supports(mx.zeros((1, 256), dtype=mx.float32), wq, 4, 64)
    assert not gather_cuda.supports(mx.zeros((1, 256), dtype=mx.bfloat16), wq[0], 4, 64)


def test_routing_rule_from_the_measurements():
    from jang_serve.kernels.gather import kernel_wins

    # Mixtral-like experts (14336 x 4096): every measured count, sorted or not
    assert all(kernel_wins(p, 8, 14336, 4096, p >= 64) for p in (1, 2, 16, 63, 64, 256))
    assert not kernel_wins(512, 8, 14336, 4096, True)
    # Qwen3-MoE-like (768 x 2048, 128 experts): only sorted, >= 4 pairs per expert, <= 1024
    assert not any(kernel_wins(p, 128, 768, 2048, False) for p in (8, 16, 63))
    assert not kernel_wins(256, 128, 768, 2048, True)
    assert kernel_wins(512, 128, 768, 2048, True) and kernel_wins(1024, 128, 2048, 768, True)
    assert not kernel_wins(2048, 128, 768, 2048, True)
    assert not kernel_wins(0, 8, 14336, 4096, False)


def test_metal_self_test_failure_falls_back_with_a_log_line(caplog, monkeypatch):
    """No Metal here: building the Metal kernel fails, so the guard disables it, logs why, and
    gather_qmm stays on the reference."""
    from jang_serve.kernels import gather_metal, metal_common

    monkeypatch.setattr(metal_common, "_results", {})
    monkeypatch.setattr(backend, "_disabled", set())
    with caplog.at_level("WARNING", logger="jang_serve.kernels"):
        assert gather_metal.ready() is False
    assert ("metal", "gather_qmm") in backend.disabled()
    assert "metal gather_qmm kernel disabled" in caplog.text
    monkeypatch.setattr(backend, "current", lambda: "metal")
    assert backend.for_op("gather_qmm") == "reference"
    wq, s, b = _experts(3, 8, 128, 4, 64)
    x, idx = mx.random.normal((2, 1, 128)), mx.array([2, 1])
    assert mx.allclose(gather_qmm(x, wq, s, b, idx, 4, 64), gather_qmm_reference(x, wq, s, b, idx, 4, 64)).item()


def test_warmup_entries_for_stacked_experts():
    from jang_serve.engine.models.switch import QSwitchLinear
    from jang_serve.kernels import qmm_shapes, warmup

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = QSwitchLinear(256, 64, 8, False, 4, 64)
            self.up = QSwitchLinear(256, 64, 8, False, 4, 64)     # same variant as gate
            self.down = QSwitchLinear(64 * 2, 256, 8, False, 4, 64)
            self.proj = nn.QuantizedLinear(128, 64, group_size=64, bits=8)

    shapes = qmm_shapes(Tiny())
    gathered = sorted((s["n"], s["k"], s["experts"]) for s in shapes if s["op"] == "gather_qmm")
    assert gathered == [(64, 256, 8), (256, 128, 8)]
    assert [s["bits"] for s in shapes if s["op"] == "qmm"] == [8]
    res = warmup(shapes)
    assert res["backend"] == "reference" and res["ops"] == 3 and res["calls"] == 0
