"""What a plain streaming read costs through mx.fast.cuda_kernel at GEMV sizes: the floor a GEMV of the
same bytes cannot beat in this harness. A kernel XOR-reduces a uint32 buffer with 16-byte loads (UNROLL
loads in flight per thread; grid-stride or one contiguous chunk per block) and writes one word per warp.

    python3 bench/read_floor.py OUT.json

Method as bench/kernels_bench.py: 100 calls queued, one eval, median of 5, buffers rotated over > 8x L2;
% = bytes / time / copy bandwidth. Sizes 18-132 MB give the fixed cost per call (intercept) and the
marginal bandwidth (slope) of a least-squares line, beside the same fit for the bf16 matmul (cuBLAS).
"""

from __future__ import annotations

import datetime
import json
import math
import subprocess
import sys

import mlx.core as mx
import numpy as np

from kernels_bench import CALLS, ROTATE_BYTES, copy_bandwidth, timed

SOURCE = r"""
  const uint4* p = reinterpret_cast<const uint4*>(a);
  const size_t n = (size_t)a_shape[0] / 4;
  uint32_t acc = 0;
  if constexpr (CHUNKED) {
    const size_t per = (n + gridDim.x - 1) / gridDim.x;
    const size_t b = blockIdx.x * per, e = min(n, b + per);
    for (size_t i = b + threadIdx.x; i < e; i += (size_t)blockDim.x * UNROLL) {
      uint4 v[UNROLL];
#pragma unroll
      for (int j = 0; j < UNROLL; ++j) {
        const size_t k = i + (size_t)j * blockDim.x;
        v[j] = k < e ? __ldg(p + k) : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int j = 0; j < UNROLL; ++j) acc ^= v[j].x ^ v[j].y ^ v[j].z ^ v[j].w;
    }
  } else {
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride * UNROLL) {
      uint4 v[UNROLL];
#pragma unroll
      for (int j = 0; j < UNROLL; ++j) {
        const size_t k = i + (size_t)j * stride;
        v[j] = k < n ? __ldg(p + k) : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int j = 0; j < UNROLL; ++j) acc ^= v[j].x ^ v[j].y ^ v[j].z ^ v[j].w;
    }
  }
  for (int o = 16; o; o >>= 1) acc ^= __shfl_xor_sync(0xffffffffu, acc, o);
  if ((threadIdx.x & 31) == 0) out[(blockIdx.x * blockDim.x + threadIdx.x) >> 5] = acc;
"""

_kern = None


def read(a, blocks, unroll, chunked, threads=256):
    global _kern
    if _kern is None:
        _kern = mx.fast.cuda_kernel(name="jang_read_floor", input_names=["a"], output_names=["out"], source=SOURCE)
    return _kern(inputs=[a], template=[("UNROLL", unroll), ("CHUNKED", chunked)], grid=(blocks * threads, 1, 1),
                 threadgroup=(threads, 1, 1), output_shapes=[(blocks * threads // 32,)],
                 output_dtypes=[mx.uint32])[0]


def fit(points):
    """(intercept us, slope GB/s) of time = a + bytes / bw over (bytes, us) points."""
    b = np.array([p[0] for p in points], float)
    t = np.array([p[1] for p in points], float)
    slope, icpt = np.polyfit(b, t, 1)
    return round(float(icpt), 2), round(1e-3 / float(slope), 1)


def main(path):
    bw, copies = copy_bandwidth()
    name = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                          text=True).stdout.strip()
    res = dict(benchmark="read_floor", device=name, mlx=mx.__version__,
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               copy_bandwidth_GBps=round(bw / 1e9, 1), method=__doc__.split("\n\n")[2], rows=[], fits={})
    sms = 132
    variants = [("grid-stride x1", sms * 8, 1, False), ("grid-stride x4", sms * 8, 4, False),
                ("grid-stride x4, 2 blocks/SM", sms * 2, 4, False), ("chunked x4", sms * 8, 4, True),
                ("chunked x8, 4 blocks/SM", sms * 4, 8, True)]
    sizes_mb = (18, 33, 66, 132)
    pts: dict = {}
    for mb in sizes_mb:
        nbytes = int(mb * 1e6) // 64 * 64
        nsets = max(2, math.ceil(ROTATE_BYTES / nbytes))
        bufs = [mx.random.randint(0, 2**31, (nbytes // 4,)).astype(mx.uint32) for _ in range(nsets)]
        mx.eval(bufs)
        for label, blocks, unroll, chunked in variants:
            t = timed(lambda: [read(bufs[i % nsets], blocks, unroll, chunked) for i in range(CALLS)])
            us = t[0] * 1e6
            res["rows"].append(dict(name=label, mb=mb, bytes=nbytes, us=us, pct_copy_bw=100 * nbytes / t[0] / bw))
            pts.setdefault(label, []).append((nbytes, us))
            print(f"{label:30s} {mb:4d} MB {us:7.1f} us {100 * nbytes / t[0] / bw:5.1f}%", flush=True)
        # cuBLAS at the same bytes: one row times a bf16 [n, 4096] matrix
        n = nbytes // (2 * 4096)
        del bufs
        nb = max(2, math.ceil(ROTATE_BYTES / (n * 4096 * 2)))
        mats = [(mx.random.normal((n, 4096)) * 0.05).astype(mx.bfloat16) for _ in range(nb)]
        x = mx.random.normal((1, 4096)).astype(mx.bfloat16)
        mx.eval(mats, x)
        t = timed(lambda: [x @ mats[i % nb].T for i in range(CALLS)])
        res["rows"].append(dict(name="bf16 matmul, one row", mb=mb, bytes=n * 4096 * 2, us=t[0] * 1e6,
                                pct_copy_bw=100 * n * 4096 * 2 / t[0] / bw))
        pts.setdefault("bf16 matmul, one row", []).append((n * 4096 * 2, t[0] * 1e6))
        print(f"{'bf16 matmul':30s} {mb:4d} MB {t[0] * 1e6:7.1f} us", flush=True)
        del mats
    for label, p in pts.items():
        a, s = fit(p)
        res["fits"][label] = dict(intercept_us=a, slope_GBps=s)
        print(f"fit {label:30s} intercept {a:6.2f} us, marginal {s:7.1f} GB/s", flush=True)
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "read-floor.json"))
