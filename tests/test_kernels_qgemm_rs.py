"""The register-operand warpgroup GEMM (kernels/qgemm_rs_cuda.py): the parts that run without a Hopper GPU.

- frag_stage, emulated lane by lane as the CUDA source does it (byte permutes, fields under the magic exponent,
  the exact subtraction), must give thread (g, c) the values of K (16j + 2c, +1) and (16j + 2c + 8, +9) of its
  rows for every k16 step j, at 2, 4 and 8 bits, bf16 and fp16; a wrong selector must fail it.
- The packed-row chunk permutation (woff) is a bijection and puts one chunk of 8 consecutive rows in distinct
  banks; the epilogue's lane swap writes every (feature, row) of the accumulators exactly once.
- Configurations fit; the source carries the instruction the tile asks for; without NVRTC (this machine) the
  kernel turns itself off with a log line; kernels.qmm routes the measured row ranges to it.
The CUDA parity runs on the device (bench/qgemm_wg_bench.py rs_parity, bench/results/qgemm-rs-h100.json).
"""

from __future__ import annotations

import importlib
import logging
import struct

import mlx.core as mx
import numpy as np
import pytest

from jang_serve.kernels import nvrtc, qgemm_rs_cuda as rs, qgemm_rs_source as src

qmm_mod = importlib.import_module("jang_serve.kernels.qmm")

MAGIC = {True: 0x43004300, False: 0x64006400}   # bf16 (128, 128), fp16 (1024, 1024)


def prmt(a: int, b: int, sel: int) -> int:
    """PTX prmt.b32 (default mode): result byte i = byte (sel nibble i & 7) of the pair {b:a}."""
    src_bytes = struct.pack("<II", a & 0xFFFFFFFF, b & 0xFFFFFFFF)
    return int.from_bytes(bytes(src_bytes[(sel >> (4 * i)) & 7] for i in range(4)), "little")


def halves(v: int, bf16: bool, magic: bool = True) -> tuple[float, float]:
    """The two 16-bit floats of a word, minus the magic (deq2 with scale 1, bias 0: exact)."""
    out = []
    for sh in (0, 16):
        h = (v >> sh) & 0xFFFF
        f = struct.unpack("<f", struct.pack("<I", h << 16))[0] if bf16 else \
            float(np.frombuffer(struct.pack("<H", h), dtype=np.float16)[0])
        out.append(f - ((128.0 if bf16 else 1024.0) if magic else 0.0))
    return out[0], out[1]


def frag_row(words: list[int], bits: int, bf16: bool, c: int, sel_hi: int = 0x7632) -> list[tuple]:
    """frag_stage for one row (the stage's packed words in K order) and lane column c: per k16 step j, the
    values of (a[j][h], a[j][2 + h]) as integers q (scale 1, bias 0)."""
    mg = MAGIC[bf16]
    out = []
    for j in range(4):
        if bits == 8 and bf16:
            w0, w1 = words[4 * j + (c >> 1)], words[4 * j + 2 + (c >> 1)]
            e = 2 * (c & 1)

            def qf(wv, byte):
                return struct.unpack("<f", struct.pack("<I", prmt(wv, 0x4B000000, 0x7440 + byte)))[0] - 8388608.0
            out.append(((qf(w0, e), qf(w0, e + 1)), (qf(w1, e), qf(w1, e + 1))))
            continue
        if bits == 4:
            sel = c | (c << 4) | ((4 + c) << 8) | ((4 + c) << 12)
            t = prmt(words[2 * j], words[2 * j + 1], sel)
            lo, hi = (t & 0x000F000F) | mg, ((t >> 4) & 0x000F000F) | mg
        elif bits == 2:
            t = words[j] >> (4 * c)
            lo, hi = (t & 0x00030003) | mg, ((t >> 2) & 0x00030003) | mg
        else:
            w0, w1 = words[4 * j + (c >> 1)], words[4 * j + 2 + (c >> 1)]
            e = 2 * (c & 1)
            lo = (prmt(w0, w1, e | (e << 4) | ((4 + e) << 8) | ((4 + e) << 12)) & 0x00FF00FF) | mg
            e1 = e + 1
            hi = (prmt(w0, w1, e1 | (e1 << 4) | ((4 + e1) << 8) | ((4 + e1) << 12)) & 0x00FF00FF) | mg
        out.append((halves(prmt(lo, hi, 0x5410), bf16), halves(prmt(lo, hi, sel_hi), bf16)))
    return out


def pack_row(q: np.ndarray, bits: int) -> list[int]:
    """64 values of one row and stage -> MLX's packed uint32 words (field i of a word at bits i * bits)."""
    per = 32 // bits
    return [int(sum(int(v) << (bits * i) for i, v in enumerate(q[w * per:(w + 1) * per]))) for w in range(64 // per)]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("bf16", [True, False])
def test_fragments_hold_their_k_positions(bits, bf16):
    rng = np.random.default_rng(bits + 10 * bf16)
    q = rng.integers(0, 2 ** bits, size=64)
    words = pack_row(q, bits)
    for c in range(4):
        got = frag_row(words, bits, bf16, c)
        for j in range(4):
            k = 16 * j + 2 * c
            assert got[j][0] == (q[k], q[k + 1]), (bits, bf16, c, j)
            assert got[j][1] == (q[k + 8], q[k + 9]), (bits, bf16, c, j)


def test_a_wrong_permute_fails_the_emulation():
    q = np.arange(64) % 16
    words = pack_row(q, 4)
    got = frag_row(words, 4, True, 1, sel_hi=0x5410)   # the low selector twice: a[j][2+h] would repeat a[j][h]
    assert got[0][1] != (q[10], q[11])


def test_source_has_the_emulated_operations():
    s = src.source(4, 64, True, 256, 4, False)
    for text in ("c | (c << 4) | ((4 + c) << 8) | ((4 + c) << 12)", "mask_magic(t, 0x000F000Fu)",
                 "mask_magic(t >> 4, 0x000F000Fu)", "prmt(lo, hi, 0x5410)", "prmt(lo, hi, 0x7632)",
                 'lop3.b32 %0, %1, %2, %3, 0xEA;',
                 "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16", "{%128, %129, %130, %131}"):
        assert text in s, text
    assert "m64n96k16.f32.f16.f16" in src.source(2, 32, False, 96, 3, True)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_woff_is_a_bijection_without_bank_conflicts(bits):
    rb = 64 * bits // 8
    rch, rpl = rb // 16, 128 // rb

    def woff(r, c):
        return r * rb + ((c ^ ((r // rpl) & (rch - 1))) << 4)
    offs = {woff(r, c) for r in range(128) for c in range(rch)}
    assert offs == {16 * i for i in range(128 * rch)}
    for base in range(0, 128, 8):
        for c in range(rch):
            banks = [(woff(base + g, c) // 16) % 8 for g in range(8)]
            assert len(set(banks)) == 8, (bits, base, c, banks)


@pytest.mark.parametrize("r", [96, 256])
def test_epilogue_writes_every_output_once(r):
    """store_rs: lane (g, c) holds d[4i + e] = (feature g (+8 for e >= 2), row 8i + 2c (+1 for odd e)); after
    the swap with lane ^ 4 it stores (fb, fb+1) and (fb+8, fb+9) of row 8i + 2c + odd."""
    d = {(g, c): [(g + 8 * (e >> 1), 8 * i + 2 * c + (e & 1)) for i in range(r // 8) for e in range(4)]
         for g in range(8) for c in range(4)}
    written = []
    for (g, c), vals in d.items():
        odd = g & 1
        partner = d[(g ^ 1, c)]
        fb = g - odd
        for i in range(r // 8):
            v0, v1, v2, v3 = vals[4 * i:4 * i + 4]
            p = partner[4 * i:4 * i + 4]
            r0 = p[0] if not odd else p[1]   # what the partner sent: odd partners send v0/v2, even ones v1/v3
            r1 = p[2] if not odd else p[3]
            row = 8 * i + 2 * c + odd
            pair_a = (r0, v1) if odd else (v0, r0)
            pair_b = (r1, v3) if odd else (v2, r1)
            written += [(pair_a[0], (fb, row)), (pair_a[1], (fb + 1, row)),
                        (pair_b[0], (fb + 8, row)), (pair_b[1], (fb + 9, row))]
    assert all(val == pos for val, pos in written)
    assert sorted(pos for _, pos in written) == sorted((f, row) for f in range(16) for row in range(r))


def test_config_and_shared_memory():
    cfg = rs.config(256, 14336, 4096, 4)
    assert cfg == dict(R=256, stages=4, split=1, CW=2)
    assert rs.config(100, 14336, 4096, 4)["R"] == 128
    assert rs.config(96, 4096, 14336, 4)["split"] == 4          # 32 blocks: split until ~132
    for bits in (2, 4, 8):
        assert rs.smem_bytes(bits, 256, 4) <= rs.SMEM_MAX
    assert rs.config(300, 512, 1024, 4)["R"] == 256              # two row tiles
    with pytest.raises(ValueError):
        rs.config(128, 1000, 4096, 4)                            # N not a multiple of 128
    with pytest.raises(ValueError):
        rs.config(128, 4096, 4096, 4, r=100)                     # the row tile is a multiple of 32
    with pytest.raises(ValueError):
        rs.config(256, 4096, 4096, 8, stages=6)                  # 6 stages of 256 rows at 8 bits do not fit


def test_without_nvrtc_it_turns_itself_off(caplog):
    try:
        nvrtc.library()
        pytest.skip("NVRTC is present here: the device bench covers the compiled kernel")
    except nvrtc.NvrtcError:
        pass
    rs._checked.clear()
    with caplog.at_level(logging.WARNING, logger="jang_serve.kernels"):
        assert rs.ready(mx.bfloat16, mx.bfloat16, 4, 64) is False
    assert "qgemm_rs" in caplog.text and "disabled" in caplog.text
    assert rs.ready(mx.float16, mx.float32, 4, 64) is False


def _route(m, bits, n=4096, sdtype=mx.bfloat16, **kw):
    x, w = mx.zeros((m, 512), dtype=mx.bfloat16), mx.zeros((n, 512 * bits // 32), dtype=mx.uint32)
    return qmm_mod._cuda_route(m, x, w, bits, 64, sdtype, **kw)


@pytest.mark.parametrize("m,bits,want", [
    (63, 4, "qgemm"), (64, 4, "rs"), (96, 2, "rs"), (128, 4, "rs"), (256, 4, "rs"), (257, 4, "dequant"),
    (96, 8, "wg"), (128, 8, "wg"), (129, 8, "rs"), (256, 8, "rs"), (200, 3, "dequant"),
])
def test_route(m, bits, want, monkeypatch):
    for v in ("JANG_QGEMM", "JANG_QGEMM_IMPL", "JANG_QGEMM_WG", "JANG_QGEMM_WG_MIN_ROWS", "JANG_QGEMM_WG_MAX_ROWS",
              "JANG_QGEMM_RS", "JANG_QGEMM_RS_ROWS"):
        monkeypatch.delenv(v, raising=False)
    assert _route(m, bits) == want


def test_route_switches(monkeypatch):
    for v in ("JANG_QGEMM_WG", "JANG_QGEMM_RS", "JANG_QGEMM_RS_ROWS"):
        monkeypatch.delenv(v, raising=False)
    assert _route(160, 4, sdtype=mx.float32) == "qgemm"          # fp32 scales: neither warpgroup GEMM
    assert _route(160, 4, rs=False) == "wg"                      # qmm's fallback when the self-test failed
    monkeypatch.setenv("JANG_QGEMM_RS", "0")
    assert _route(160, 4) == "wg"
    monkeypatch.delenv("JANG_QGEMM_RS")
    monkeypatch.setenv("JANG_QGEMM_WG", "0")                     # both warpgroup GEMMs off
    assert _route(160, 4) == "qgemm" and _route(80, 4) == "qgemm"
    monkeypatch.delenv("JANG_QGEMM_WG")
    monkeypatch.setenv("JANG_QGEMM_RS_ROWS", "100-128")
    assert _route(110, 4) == "rs" and _route(192, 4) == "wg" and _route(110, 8) == "rs"
    monkeypatch.setenv("JANG_QGEMM_RS_ROWS", "100:128")
    with pytest.raises(ValueError, match="JANG_QGEMM_RS_ROWS"):
        _route(110, 4)
