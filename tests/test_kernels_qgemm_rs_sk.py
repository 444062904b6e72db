"""The stream-K schedule of the register-operand GEMM (kernels/qgemm_rs_source.py, SK): its unit split and the
partial-tile fix-up protocol, emulated block by block with the source's formulas, over every order in which the
blocks of a tile can arrive.

- Every (tile, K stage) unit is computed by exactly one block; each block's range is a run of whole segments.
- A partial tile's counter target (bl - bf) is its number of segments; the slots a launch writes are distinct
  and below 2G (the workspace the launch allocates); every raised flag is consumed and set back to zero, and so
  is every counter (the buffer is reused by the next launch).
- The last block to arrive holds the tile's sum in block order, bit for bit the same whichever block that is.
The CUDA parity of the kernel itself runs on the device (bench/qgemm_wg_bench.py rs_parity).
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from jang_serve.kernels import qgemm_rs_cuda as rs, qgemm_rs_source as src


def blk_of(u, g, U):
    return ((u + 1) * g - 1) // U


def blk_start(b, g, U):
    return b * U // g


def slot_of(b, t0, g, U):
    return 2 * b + (0 if blk_start(b, g, U) >= t0 else 1)


def segments(tiles, nk, g):
    """The kernel's loop: per block, its (tile, ks, ke) segments."""
    U = tiles * nk
    out = []
    for b in range(g):
        segs, u, ue = [], blk_start(b, g, U), blk_start(b + 1, g, U)
        while u < ue:
            t, ks = divmod(u, nk)
            ke = min(nk, ks + (ue - u))
            segs.append((t, ks, ke))
            u += ke - ks
        out.append(segs)
    return out


def run_launch(tiles, nk, g, order_seed, parts):
    """One launch with the blocks of each partial tile arriving in a seeded random order: returns the tile sums
    the last arrivals store, the slots written, and the sync buffer after the launch."""
    U = tiles * nk
    cnt, flags, ws = [0] * tiles, [0] * (2 * g), {}
    segs = segments(tiles, nk, g)
    by_tile: dict[int, list[int]] = {}
    for b, bs in enumerate(segs):
        for t, ks, ke in bs:
            if not (ks == 0 and ke == nk):
                by_tile.setdefault(t, []).append(b)
    rng, out, written = random.Random(order_seed), {}, []
    for t, blocks in by_tile.items():
        t0 = t * nk
        bf, bl = blk_of(t0, g, U), blk_of(t0 + nk - 1, g, U)
        sbf = slot_of(bf, t0, g, U)
        assert blocks == list(range(bf, bl + 1))
        arrival = blocks[:]
        rng.shuffle(arrival)
        for b in arrival:
            d = parts[(t, b)].copy()
            last = cnt[t] == bl - bf
            cnt[t] += 1
            if not last:
                s = sbf if b == bf else 2 * b
                ws[s] = d
                written.append(s)
                flags[s] = 1
                continue
            cnt[t] = 0
            for o in range(bf, bl + 1):
                if o != b:
                    s = sbf if o == bf else 2 * o
                    assert flags[s] == 1, "the last block waits on a flag nobody raises"
                    flags[s] = 0
            if b != bf:
                ws[2 * b] = d
                d = ws[sbf].copy()
            for o in range(bf + 1, bl + 1):
                d = (d + ws[2 * o]).astype(np.float32)
            out[t] = d
    return out, written, cnt, flags


CASES = [(112, 64, 132), (224, 64, 132), (48, 64, 132), (32, 64, 132), (4, 16, 64), (2, 64, 132), (1, 1, 1),
         (7, 3, 21), (132, 5, 132), (264, 64, 132), (10, 224, 132), (3, 100, 114)]


@pytest.mark.parametrize("tiles,nk,g", CASES)
def test_units_cover_every_tile_stage_once(tiles, nk, g):
    g = min(g, tiles * nk)              # sk_grid: at most one block per unit
    seen = np.zeros((tiles, nk), dtype=int)
    for bs in segments(tiles, nk, g):
        assert bs, "a block without units"
        for t, ks, ke in bs:
            assert 0 <= ks < ke <= nk
            seen[t, ks:ke] += 1
    assert (seen == 1).all()


@pytest.mark.parametrize("tiles,nk,g", CASES)
def test_fixup_sums_in_block_order_whoever_arrives_last(tiles, nk, g):
    g = min(g, tiles * nk)
    rng = np.random.default_rng(0)
    segs = segments(tiles, nk, g)
    parts = {(t, b): rng.standard_normal(8).astype(np.float32) * np.float32(10.0) ** rng.integers(-3, 4)
             for b, bs in enumerate(segs) for t, _, _ in bs}
    want = {}
    for (t, b), p in sorted(parts.items()):
        want[t] = p.copy() if t not in want else (want[t] + p).astype(np.float32)
    partial = {t for b, bs in enumerate(segs) for t, ks, ke in bs if not (ks == 0 and ke == nk)}
    for seed in range(6):
        out, written, cnt, flags = run_launch(tiles, nk, g, seed, parts)
        assert set(out) == partial
        for t in partial:
            assert np.array_equal(out[t], want[t]), (t, seed)
        assert len(written) == len(set(written)) and all(0 <= s < 2 * g for s in written)
        assert not any(cnt) and not any(flags)


def test_every_arrival_order_of_a_three_way_tile():
    tiles, nk, g = 2, 8, 6                 # tiles split over blocks 0-2 and 3-5 (8 units, ~2.7 per block)
    segs = segments(tiles, nk, g)
    parts = {(t, b): np.float32([0.1, 1e8, -1e8, 3.3]) * (b + 1) for b, bs in enumerate(segs) for t, _, _ in bs}
    results = set()
    for perm_seed in range(40):
        out, *_ = run_launch(tiles, nk, g, perm_seed, parts)
        results.add(tuple(out[0].tolist()))
    assert len(results) == 1


def test_a_wrong_slot_fails_the_emulation():
    """The reader must take bf's part from slot 2bf + 1 when bf started before the tile: reading 2bf (its
    first tile's slot) instead finds nothing there or another tile's part."""
    tiles, nk, g = 112, 64, 132
    U = tiles * nk
    bad = 0
    for t in range(tiles):
        t0 = t * nk
        bf = blk_of(t0, g, U)
        if blk_start(bf, g, U) < t0:
            assert slot_of(bf, t0, g, U) == 2 * bf + 1
            bad += 1
    assert bad > 50


def test_source_carries_the_emulated_schedule():
    s = src.source(4, 64, True, 256, 4, False, 2, True)
    for text in ("return (int)(((u64)(u + 1) * G - 1) / U);", "return (u32)((u64)b * U / G);",
                 "2 * b + (blk_start(b, G, U) >= t0 ? 0 : 1)", "atom_add(cnt + t, 1) == bl - bf",
                 "const int s = b == bf ? sbf : 2 * b;", "for (int o = bf + 1; o <= bl; ++o) add(2 * o, false);",
                 "ke = ks + (ue - u) < NK ? ks + (ue - u) : NK", "ld.acquire.gpu.global.s32", "st.release.gpu"):
        assert text in s, text
    assert "#define SK 0" in src.source(4, 64, True, 256, 4, True)
    with pytest.raises(ValueError):
        src.source(4, 64, True, 256, 4, True, 2, True)


def test_config_and_grid():
    assert rs.config(256, 14336, 4096, 4)["SK"] is True
    assert rs.config(256, 14336, 4096, 4, split=2)["SK"] is False
    assert rs.config(96, 4096, 14336, 4)["split"] == 1              # stream-K fills the GPU without split-K
    assert rs.config(96, 4096, 14336, 4, sk=False)["split"] == 4
    tiles, g = rs.sk_grid(256, 14336, 4096, 256, 2)
    assert tiles == 112 and g == min(rs.nvrtc.sm_count(), 112 * 64)
    assert rs.sk_grid(32, 128, 64, 32, 2) == (1, 1)                 # one unit: one block
