"""Launch configuration of the tiled GEMM (kernels/qgemm_cuda.py): which shapes it takes, rows per
block, pipeline stages that fit in shared memory, split-K, warps along M. Pure Python (no kernel),
so the CPU tests check every rule."""

from __future__ import annotations

import os

import mlx.core as mx

BN, BK, THREADS = 128, 64, 256
TARGET_BLOCKS = 264            # two blocks per SM on a 132-SM H100 / H200
MIN_K_PER_SPLIT = 256
SMEM_LIMIT = 48 * 1024         # static shared memory of one block
MAX_STAGES = 4
no_init_value = False        # set by qgemm_cuda when this MLX has no init_value for CUDA kernels

def default_reduce() -> str:
    """How split-K partial sums are combined: "kernel" (each split stores its fp32 partials, one small
    kernel sums them and casts: 2 launches) or "atomic" (atomicAdd into a zero-filled fp32 output,
    then a cast: fill + kernel + cast). JANG_QGEMM_REDUCE overrides."""
    return os.environ.get("JANG_QGEMM_REDUCE", "kernel").strip() or "kernel"


def supports(x: mx.array, w: mx.array, bits: int, group_size: int) -> bool:
    k = x.shape[-1]
    return (x.dtype in (mx.bfloat16, mx.float16) and bits in (2, 4, 8) and group_size in (32, 64, 128)
            and k % BK == 0 and (k // group_size) % 2 == 0 and w.shape[0] % BN == 0 and w.dtype == mx.uint32
            and w.shape[-1] * 32 == k * bits)


def stage_bytes(bits: int, bm: int, scale_bytes: int = 2) -> int:
    """Shared memory of one pipeline stage (mirrors STB in the kernel)."""
    ch = BK * bits // 128
    wrow = 16 * (ch if ch % 2 else ch + 1)
    return BN * wrow + bm * BK * 2 + 2 * BN * 2 * scale_bytes


def max_stages(bits: int, bm: int, scale_bytes: int = 2) -> int:
    return min(MAX_STAGES, SMEM_LIMIT // stage_bytes(bits, bm, scale_bytes))


def block_rows(m: int, bits: int = 4, scale_bytes: int = 2) -> int:
    """Rows of x per block: 16/32/64/128, the largest that keeps two pipeline stages in shared memory."""
    bm = 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128
    while bm > 16 and max_stages(bits, bm, scale_bytes) < 2:
        bm //= 2
    return bm


def default_warps_m(bm: int, bits: int = 4) -> int:
    """Warps along M (of 8): 1 up to 32 rows (each warp owns 16 features: no weight is dequantized
    twice), 2 from 64 (warp tiles of 32-64 rows x 32 features); 1 at 8 bits (H100 under Nsight
    Compute, 6144x4096: 46 vs 48 us at 64 rows, 81 vs 87 at 128; qgemm-gputime-h100.json)."""
    return 1 if bm <= 32 or bits == 8 else 2


def default_split(m: int, n: int, k: int, bm: int | None = None, bits: int = 4) -> int:
    """Split K when there are too few column blocks to fill the GPU (grid_split); JANG_QGEMM_SPLIT=1
    turns splitting off."""
    if os.environ.get("JANG_QGEMM_SPLIT", "grid").strip() == "1":
        return 1
    return grid_split(m, n, k, bm, bits)


def grid_split(m: int, n: int, k: int, bm: int | None = None, bits: int = 4) -> int:
    """Split K until the grid has about TARGET_BLOCKS blocks, keeping >= MIN_K_PER_SPLIT per split."""
    bm = bm or block_rows(m, bits)
    blocks = (n // BN) * (-(-m // bm))
    s = 1
    while (blocks * s * 2 <= TARGET_BLOCKS and k % (BK * s * 2) == 0 and k // (s * 2) >= MIN_K_PER_SPLIT):
        s *= 2
    return s


def default_stages(bm: int, bits: int = 4, scale_bytes: int = 2) -> int:
    """As many as fit at 16 rows; 2 from 32 rows (H100: 2 stages were as fast or faster than 3-4 at
    32-256 rows, e.g. 75 vs 81 us GPU time for 14336x4096 at 64 rows, 131 vs 145 for 28672x4096;
    qgemm-gputime-h100.json)."""
    return max_stages(bits, bm, scale_bytes) if bm <= 16 else min(2, max_stages(bits, bm, scale_bytes))


def config(m: int, n: int, k: int, bits: int, scale_bytes: int = 2, BM: int | None = None, WM: int | None = None,
           split: int | None = None, stages: int | None = None, reduce: str | None = None) -> dict:
    bm = BM or block_rows(m, bits, scale_bytes)
    st = stages or default_stages(bm, bits, scale_bytes)
    if st < 2 or st > max_stages(bits, bm, scale_bytes):
        raise ValueError(f"qgemm: {st} stages of BM={bm} at {bits} bits do not fit in shared memory")
    s = split or default_split(m, n, k, bm, bits)
    if no_init_value and (reduce or default_reduce()) == "atomic":
        s = 1
    if k % (BK * s):
        raise ValueError(f"qgemm: K={k} does not split into {s} parts of whole 64-wide tiles")
    wm = WM or default_warps_m(bm, bits)
    if bm // wm < 16:
        raise ValueError(f"qgemm: BM={bm} with {wm} warps along M")
    red = reduce or default_reduce()
    if red not in ("kernel", "atomic"):
        raise ValueError(f"qgemm: reduce must be 'kernel' or 'atomic', got {red!r}")
    return dict(BM=bm, WM=wm, split=s, stages=st, reduce=red)
