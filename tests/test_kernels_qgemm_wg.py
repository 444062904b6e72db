"""The warpgroup GEMM (kernels/qgemm_wg_cuda.py): the parts that run without a Hopper GPU.

- The dequant's bit tricks, emulated word by word as the CUDA source does them (field pairs under the magic
  exponent, byte permutes), must put every value at its K position: o[4c + j] holds values (8c + 2j, 8c + 2j + 1).
- The 128-byte swizzle gives every 16-byte chunk of a row its own slot and spreads one chunk column of 8 rows
  over all 8 bank groups.
- Tiles, stages and shared memory of the default configurations fit; the source is the instruction the tile
  asks for; without NVRTC (this machine) the kernel turns itself off with a log line and qmm routes elsewhere.
The CUDA parity runs on the device (bench/qgemm_wg_bench.py, bench/results/qgemm-wg-h100.json).
"""

from __future__ import annotations

import importlib
import logging
import struct

import mlx.core as mx
import numpy as np
import pytest

from jang_serve.kernels import nvrtc, qgemm_wg_cuda as wg, qgemm_wg_source as src

qmm_mod = importlib.import_module("jang_serve.kernels.qmm")   # (kernels.qmm, the attribute, is the function)

MAGIC = {True: 0x4300, False: 0x6400}   # bf16 128.0, fp16 1024.0


def prmt(a: int, b: int, sel: int) -> int:
    """PTX prmt.b32 (default mode): result byte i = byte (sel nibble i & 7) of the pair {b:a}."""
    src_bytes = struct.pack("<II", a & 0xFFFFFFFF, b & 0xFFFFFFFF)
    return int.from_bytes(bytes(src_bytes[(sel >> (4 * i)) & 7] for i in range(4)), "little")


def half_value(h: int, bf16: bool) -> float:
    if bf16:
        return struct.unpack("<f", struct.pack("<I", h << 16))[0]
    return float(np.frombuffer(struct.pack("<H", h), dtype=np.float16)[0])


def pair_q(v: int, bf16: bool) -> tuple[int, int]:
    """The integers (lo, hi) a packed pair of (magic + q) holds."""
    m = half_value(MAGIC[bf16], bf16)
    return tuple(int(half_value((v >> s) & 0xFFFF, bf16) - m) for s in (0, 16))


def dequant_unit_q(words: list[int], bits: int, bf16: bool, sel=(0x5410, 0x7632)) -> list[int]:
    """The kernel's dequant_unit with the scale 1 and bias 0 (exact): 16 output words -> the 32 values in order."""
    lo_sel, hi_sel = sel
    mg = MAGIC[bf16] * 0x10001
    o = [0] * 16
    if bits == 4:
        for c in range(4):
            w = words[c]
            d = [((w >> (4 * i)) & 0x000F000F) | mg for i in range(4)]
            o[4 * c:4 * c + 4] = [prmt(d[0], d[1], lo_sel), prmt(d[2], d[3], lo_sel),
                                  prmt(d[0], d[1], hi_sel), prmt(d[2], d[3], hi_sel)]
    elif bits == 2:
        for h in range(2):
            w = words[h]
            d = [((w >> (2 * i)) & 0x00030003) | mg for i in range(8)]
            for j in range(4):
                o[8 * h + j] = prmt(d[2 * j], d[2 * j + 1], lo_sel)
                o[8 * h + 4 + j] = prmt(d[2 * j], d[2 * j + 1], hi_sel)
    elif not bf16:   # 8 bits, fp16
        for c in range(8):
            w = words[c]
            d0, d1 = (w & 0x00FF00FF) | mg, ((w >> 8) & 0x00FF00FF) | mg
            o[2 * c], o[2 * c + 1] = prmt(d0, d1, lo_sel), prmt(d0, d1, hi_sel)
    else:            # 8 bits, bf16: fp32 magic 2^23 + q, packed in pairs
        out = []
        for c in range(8):
            for i in range(4):
                f = struct.unpack("<f", struct.pack("<I", prmt(words[c], 0x4B000000, 0x7440 + i)))[0]
                out.append(int(f - 8388608.0))
        return out
    vals = []
    for v in o:
        vals += list(pair_q(v, bf16))
    return vals


def pack(q: np.ndarray, bits: int) -> list[int]:
    """MLX's packing: a little-endian stream of `bits`-bit fields in 32-bit words."""
    per = 32 // bits
    return [int(sum(int(q[i * per + j]) << (bits * j) for j in range(per))) for i in range(len(q) // per)]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("bf16", [True, False])
def test_dequant_unit_puts_every_value_at_its_k(bits, bf16):
    rng = np.random.default_rng(bits + 10 * bf16)
    for _ in range(20):
        q = rng.integers(0, 1 << bits, size=32)
        assert dequant_unit_q(pack(q, bits), bits, bf16) == [int(v) for v in q]


def test_dequant_emulation_can_fail():
    """Swapping the byte-permute selectors (the K order) breaks the check above."""
    q = np.arange(32) % 16
    assert dequant_unit_q(pack(q, 4), 4, True, sel=(0x7632, 0x5410)) != [int(v) for v in q]


def toff(r: int, c: int) -> int:
    """Mirror of the kernel's toff (SWZ): byte offset of 16-byte chunk c of tile row r."""
    return r * 128 + ((c ^ (r & 7)) << 4)


def test_swizzle_is_a_permutation_and_conflict_free():
    offs = {toff(r, c) for r in range(64) for c in range(8)}
    assert offs == set(range(0, 64 * 128, 16))
    for c in range(8):   # one chunk column of an 8-row atom: 8 distinct 16-byte bank groups
        assert len({(toff(r, c) // 16) % 8 for r in range(8)}) == 8


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("m", [96, 128, 200, 256])
@pytest.mark.parametrize("n,k", [(14336, 4096), (4096, 14336), (6144, 4096)])
def test_default_config_fits(bits, m, n, k):
    cfg = wg.config(m, n, k, bits)
    assert cfg["MT"] * cfg["BN"] <= 256                     # at most 128 fp32 accumulators per thread
    assert wg.smem_bytes(bits, cfg["BN"], cfg["stages"], cfg["WGS"], cfg["MT"], cfg["ws"]) <= wg.SMEM_MAX
    assert cfg["ws"] == (2 if cfg["MT"] == 2 else 0)                # warp-specialized for 256-row blocks
    assert not cfg["ws"] or 2 * cfg["stages"] + 1 < 16              # its named barriers fit the 16
    assert k % (wg.BK * cfg["split"]) == 0 and n % cfg["BN"] == 0
    assert cfg["MT"] == (1 if m <= 128 else 2)
    blocks = -(-m // (64 * cfg["WGS"] * cfg["MT"])) * (n // cfg["BN"]) * cfg["split"]
    assert blocks <= 2 * wg.TARGET_BLOCKS or cfg["split"] == 1


def test_config_rejects_what_does_not_fit():
    with pytest.raises(ValueError):
        wg.config(256, 4096, 4096, 4, bn=256, mt=2)         # 256 accumulators per thread
    with pytest.raises(ValueError):
        wg.config(128, 4000, 4096, 4)                       # N not a multiple of the tile
    with pytest.raises(ValueError):
        wg.config(128, 4096, 4096, 8, stages=9)             # shared memory
    with pytest.raises(ValueError):
        wg.config(256, 4096, 4096, 4, bn=256, mt=1, ws=2)   # 512 threads: no room for an m64n256 wgmma


def test_ws_source():
    s = src.source(4, 64, True, 128, 4, False, 2, 2, ws=2)
    assert "#define PWG 2" in s and "#define PREG 80" in s and "#define CREG 176" in s
    assert "bar.arrive" in s and "setmaxnreg.inc" in s
    assert 2 * 128 * 80 + 2 * 128 * 176 <= 65536                          # the register file


def test_source_asks_for_the_tile_instruction():
    s = src.source(4, 64, True, 128, 4, False, 2, 2)
    assert "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16" in s
    assert "%64, %65, p" in s and "#define MT 2" in s                 # 64 accumulators, then the descriptors
    s16 = src.source(8, 32, False, 256, 3, True, 2, 1)
    assert "m64n256k16.f32.f16.f16" in s16 and "%128, %129, p" in s16 and "#define OUT_T float" in s16
    assert "#include" not in s                                          # NVRTC gets it without include paths


def test_supports():
    x = mx.zeros((128, 4096), dtype=mx.bfloat16)
    w = mx.zeros((14336, 4096 * 4 // 32), dtype=mx.uint32)
    assert wg.supports(x, w, 4, 64, mx.bfloat16)
    assert not wg.supports(x, w, 4, 64, mx.float32)         # scales must be in x's dtype
    assert not wg.supports(x.astype(mx.float32), w, 4, 64)
    assert not wg.supports(x, mx.zeros((14336, 4096 * 3 // 32), dtype=mx.uint32), 3, 64)


def test_without_nvrtc_it_turns_itself_off(caplog):
    """This machine has no NVRTC (and no GPU): the first use logs and reports not ready; qmm's route then
    falls back (qmm picks the route with wg=False)."""
    try:
        nvrtc.library()
        pytest.skip("NVRTC is present here: the device bench covers the compiled kernel")
    except nvrtc.NvrtcError:
        pass
    wg._checked.clear()
    with caplog.at_level(logging.WARNING, logger="jang_serve.kernels"):
        assert wg.ready(mx.bfloat16, mx.bfloat16, 4, 64) is False
    assert "qgemm_wg" in caplog.text and "disabled" in caplog.text
    assert wg.ready(mx.float16, mx.float32, 4, 64) is False  # fp32 scales: not this kernel's case


def _args(m, n, k, bits):
    return mx.zeros((m, k), dtype=mx.bfloat16), mx.zeros((n, k * bits // 32), dtype=mx.uint32)


@pytest.mark.parametrize("m,bits,n,want", [
    (qmm_mod.WG_MIN_ROWS - 1, 4, 4096, "qgemm"), (qmm_mod.WG_MIN_ROWS, 4, 4096, "wg"),
    (qmm_mod.WG_MAX_ROWS, 2, 14336, "wg"), (qmm_mod.WG_MAX_ROWS, 8, 4096, "wg"),
    (qmm_mod.WG_MAX_ROWS + 1, 4, 4096, "dequant"), (200, 3, 4096, "dequant"),   # 3 bits: not this kernel
    (128, 4, 1000, "reference"),                                                # N not a multiple of 128
])
def test_route(m, bits, n, want, monkeypatch):
    for v in ("JANG_QGEMM", "JANG_QGEMM_IMPL", "JANG_QGEMM_WG", "JANG_QGEMM_WG_MIN_ROWS", "JANG_QGEMM_WG_MAX_ROWS"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("JANG_QGEMM_RS", "0")   # the register-operand GEMM's ranges: test_kernels_qgemm_rs
    x, w = _args(m, n, 512, bits)
    assert qmm_mod._cuda_route(m, x, w, bits, 64, mx.bfloat16) == want


def test_route_switches(monkeypatch):
    monkeypatch.setenv("JANG_QGEMM_RS", "0")
    x, w = _args(128, 4096, 512, 4)
    monkeypatch.setenv("JANG_QGEMM_WG", "0")
    assert qmm_mod._cuda_route(128, x, w, 4, 64, mx.bfloat16) == "qgemm"
    monkeypatch.delenv("JANG_QGEMM_WG")
    assert qmm_mod._cuda_route(128, x, w, 4, 64, mx.float32) == "qgemm"       # fp32 scales
    assert qmm_mod._cuda_route(128, x, w, 4, 64, mx.bfloat16, wg=False) == "qgemm"
    monkeypatch.setenv("JANG_QGEMM_WG_MIN_ROWS", "200")
    assert qmm_mod._cuda_route(128, x, w, 4, 64, mx.bfloat16) == "qgemm"


def test_cubin_cache_follows_the_home(monkeypatch, tmp_path):
    monkeypatch.delenv("JANG_SERVE_CUBIN_CACHE", raising=False)
    monkeypatch.setenv("JANG_SERVE_HOME", str(tmp_path))
    assert nvrtc._cache_dir() == str(tmp_path / "cubin")
    monkeypatch.setenv("JANG_SERVE_CUBIN_CACHE", str(tmp_path / "elsewhere"))
    assert nvrtc._cache_dir() == str(tmp_path / "elsewhere")
