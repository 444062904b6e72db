"""What a plain streaming read costs through mx.fast.cuda_kernel at GEMV sizes: the floor a GEMV of the
same bytes cannot beat in this harness. A kernel XOR-reduces a uint32 buffer with 16-byte loads (UNROLL
loads in flight per thread; grid-stride or one contiguous chunk per block) and writes one word per warp.

    python3 bench/read_floor.py OUT.json

Also a bulk-copy reader (one `cp.async.bulk` per piece into a shared-memory ring, completion on an mbarrier).
READ_ONLY=a,b keeps the variants whose label contains a or b; READ_MB=18,33 sets the sizes; READ_PROBE=1 first
times the plain reader at 33 MB queued three ways (100 or 400 independent calls, a chain of 100) with the host's
dispatch time (READ_PROBE=only: nothing else). bench/read_floor_raw.py runs the same source without MLX.

Method as bench/kernels_bench.py: 100 calls queued, one eval, median of 5, buffers rotated over > 8x L2;
% = bytes / time / copy bandwidth. Sizes 18-132 MB give the fixed cost per call (intercept) and the
marginal bandwidth (slope) of a least-squares line, beside the same fit for the bf16 matmul (cuBLAS).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import time

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

# Bulk copies (sm_90): one thread per block streams the block's contiguous share in CHUNK-byte pieces through a
# STAGES-slot ring in shared memory with `cp.async.bulk` (one instruction per piece, completion counted on an
# mbarrier per slot); all threads XOR each piece out of shared memory, then the slot is refilled.
BULK_HEADER = r"""
__device__ __forceinline__ uint32_t rf_smem(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void rf_bar_init(uint64_t* b) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" :: "r"(rf_smem(b)) : "memory");
}
__device__ __forceinline__ void rf_fill(unsigned char* dst, const unsigned char* src, uint32_t bytes, uint64_t* b) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" :: "r"(rf_smem(b)), "r"(bytes) : "memory");
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
               :: "r"(rf_smem(dst)), "l"(src), "r"(bytes), "r"(rf_smem(b)) : "memory");
}
__device__ __forceinline__ void rf_wait(uint64_t* b, uint32_t parity) {
  uint32_t done = 0;
  while (!done)
    asm volatile("{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
                 " selp.u32 %0, 1, 0, p;\n}\n" : "=r"(done) : "r"(rf_smem(b)), "r"(parity) : "memory");
}
"""

BULK_SOURCE = r"""
  extern __shared__ __align__(128) unsigned char rf_ring[];
  uint64_t* full = reinterpret_cast<uint64_t*>(rf_ring + STAGES * CHUNK);
  const unsigned char* src = reinterpret_cast<const unsigned char*>(a);
  const size_t nbytes = (size_t)a_shape[0] * 4;
  const size_t nch = (nbytes + CHUNK - 1) / CHUNK, per = (nch + gridDim.x - 1) / gridDim.x;
  const size_t c0 = (size_t)blockIdx.x * per;
  const int n = c0 < nch ? (int)min(per, nch - c0) : 0;
  if (threadIdx.x == 0) {
    for (int s = 0; s < STAGES; ++s) rf_bar_init(&full[s]);
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
#define RF_BYTES(i) ((uint32_t)min((size_t)CHUNK, nbytes - (c0 + (i)) * CHUNK))
  if (threadIdx.x == 0)
    for (int i = 0; i < STAGES && i < n; ++i)
      rf_fill(rf_ring + i * CHUNK, src + (c0 + i) * CHUNK, RF_BYTES(i), &full[i]);
  uint32_t acc = 0;
  for (int i = 0; i < n; ++i) {
    const int s = i % STAGES;
    rf_wait(&full[s], (i / STAGES) & 1);
    const uint4* q = reinterpret_cast<const uint4*>(rf_ring + s * CHUNK);
    const uint32_t words = RF_BYTES(i) / 16;
    for (uint32_t j = threadIdx.x; j < words; j += blockDim.x) {
      const uint4 v = q[j];
      acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    __syncthreads();
    if (threadIdx.x == 0 && i + STAGES < n)
      rf_fill(rf_ring + s * CHUNK, src + (c0 + i + STAGES) * CHUNK, RF_BYTES(i + STAGES), &full[s]);
  }
#undef RF_BYTES
  for (int o = 16; o; o >>= 1) acc ^= __shfl_xor_sync(0xffffffffu, acc, o);
  if ((threadIdx.x & 31) == 0) out[(blockIdx.x * blockDim.x + threadIdx.x) >> 5] = acc;
"""

_kern = None
_bulk: dict = {}
# (stages, chunk bytes, blocks per SM)
BULK_VARIANTS = ((4, 32768, 1), (8, 16384, 1), (4, 16384, 2), (6, 32768, 1))


def bulk_smem(stages, chunk):
    return stages * chunk + 8 * stages


def read_bulk(a, blocks, stages, chunk, threads=256):
    """The bulk-copy reader: blocks x threads, a ring of stages x chunk bytes per block."""
    smem = bulk_smem(stages, chunk)
    k = _bulk.get(smem)
    if k is None:
        k = _bulk[smem] = mx.fast.cuda_kernel(name=f"jang_read_bulk_{len(_bulk)}", input_names=["a"],
                                              output_names=["out"], source=BULK_SOURCE, header=BULK_HEADER,
                                              shared_memory=smem)
    return k(inputs=[a], template=[("STAGES", stages), ("CHUNK", chunk)], grid=(blocks * threads, 1, 1),
             threadgroup=(threads, 1, 1), output_shapes=[(blocks * threads // 32,)], output_dtypes=[mx.uint32])[0]


_kern_dep = None


def read(a, blocks, unroll, chunked, threads=256, dep=None):
    """The plain reader; `dep` (unused by the kernel) makes the call wait for the array's producer."""
    global _kern, _kern_dep
    if _kern is None:
        _kern = mx.fast.cuda_kernel(name="jang_read_floor", input_names=["a"], output_names=["out"], source=SOURCE)
        _kern_dep = mx.fast.cuda_kernel(name="jang_read_floor_dep", input_names=["a", "dep"], output_names=["out"],
                                        source=SOURCE)
    k, ins = (_kern, [a]) if dep is None else (_kern_dep, [a, dep])
    return k(inputs=ins, template=[("UNROLL", unroll), ("CHUNKED", chunked)], grid=(blocks * threads, 1, 1),
             threadgroup=(threads, 1, 1), output_shapes=[(blocks * threads // 32,)], output_dtypes=[mx.uint32])[0]


def launch_path_probe(bw, sms=132, mb=33):
    """The plain grid-stride x4 reader at one size, queued three ways: 100 independent calls (the method),
    400 independent calls (amortizes the host's lead before the first graph runs), and 100 calls in a chain
    (each waits for the previous: no two run side by side)."""
    nbytes = int(mb * 1e6) // 64 * 64
    nsets = max(2, math.ceil(ROTATE_BYTES / nbytes))
    bufs = [mx.random.randint(0, 2**31, (nbytes // 4,)).astype(mx.uint32) for _ in range(nsets)]
    mx.eval(bufs)

    def chain(n):
        outs, prev = [], None
        for i in range(n):
            prev = read(bufs[i % nsets], sms * 8, 4, False, dep=prev)
            outs.append(prev)
        return outs

    def split(make):
        """Median over 5 of (host time for mx.async_eval to return, time to the end of the GPU work) per call."""
        mx.eval(make())
        hs, ts = [], []
        for _ in range(5):
            outs = make()
            mx.synchronize()
            t0 = time.perf_counter()
            mx.async_eval(outs)
            t1 = time.perf_counter()
            mx.synchronize()
            t2 = time.perf_counter()
            hs.append((t1 - t0) / len(outs))
            ts.append((t2 - t0) / len(outs))
        return statistics.median(hs), statistics.median(ts)

    tiny = [mx.zeros((256,), mx.uint32) + i for i in range(2)]
    mx.eval(tiny)

    def tiny_chain(n, dep):
        outs, prev = [], None
        for i in range(n):
            prev = read(tiny[i % 2], 1, 1, False, threads=32, dep=prev if dep else None)
            outs.append(prev)
        return outs

    rows = {"MLX_MAX_OPS_PER_BUFFER": os.environ.get("MLX_MAX_OPS_PER_BUFFER", "default")}
    def indep(n):
        return [read(bufs[i % nsets], sms * 8, 4, False) for i in range(n)]

    for label, make in (("independent x100", lambda: indep(CALLS)), ("independent x400", lambda: indep(4 * CALLS)),
                        ("chain x100", lambda: chain(CALLS)),
                        ("tiny kernel, independent x100", lambda: tiny_chain(CALLS, False)),
                        ("tiny kernel, chain x100", lambda: tiny_chain(CALLS, True))):
        h, t = split(make)
        rows[label] = dict(us=round(t * 1e6, 2), host_dispatch_us=round(h * 1e6, 2),
                           pct_copy_bw=round(100 * nbytes / t / bw, 1) if "tiny" not in label else None)
        print(f"probe {label:30s} {t * 1e6:7.2f} us per call, mx.async_eval returns after {h * 1e6:6.2f} us per call",
              flush=True)
    return rows


def fit(points):
    """(intercept us, slope GB/s) of time = a + bytes / bw over (bytes, us) points."""
    b = np.array([p[0] for p in points], float)
    t = np.array([p[1] for p in points], float)
    slope, icpt = np.polyfit(b, t, 1)
    return round(float(icpt), 2), round(1e-3 / float(slope), 1)


def write_fits(res, pts, path):
    """Fit each series of (bytes, us) points into res["fits"], print the fits and write res to path."""
    for label, p in pts.items():
        a, s = fit(p)
        res["fits"][label] = dict(intercept_us=a, slope_GBps=s)
        print(f"fit {label:45s} intercept {a:6.2f} us, marginal {s:7.1f} GB/s", flush=True)
    with open(path, "w") as f:
        json.dump(res, f, indent=1)


def main(path):
    bw, copies = copy_bandwidth()
    name = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                          text=True).stdout.strip()
    res = dict(benchmark="read_floor", device=name, mlx=mx.__version__,
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               copy_bandwidth_GBps=round(bw / 1e9, 1), method=__doc__.split("\n\n")[2], rows=[], fits={})
    sms = 132
    plain = (("grid-stride x1", sms * 8, 1, False), ("grid-stride x4", sms * 8, 4, False),
             ("grid-stride x4, 2 blocks/SM", sms * 2, 4, False), ("chunked x4", sms * 8, 4, True),
             ("chunked x8, 4 blocks/SM", sms * 4, 8, True))
    variants = [(label, lambda a, b=blocks, u=unroll, c=chunked: read(a, b, u, c))
                for label, blocks, unroll, chunked in plain]
    variants += [(f"bulk {st}x{ch // 1024} KB, {bps} block(s)/SM",
                  lambda a, b=sms * bps, s_=st, c=ch: read_bulk(a, b, s_, c)) for st, ch, bps in BULK_VARIANTS]
    only = os.environ.get("READ_ONLY")
    if only:
        variants = [v for v in variants if any(o in v[0] for o in only.split(","))]
    sizes_mb = tuple(int(m) for m in os.environ.get("READ_MB", "18,33,66,132").split(","))
    pts: dict = {}
    if os.environ.get("READ_PROBE"):
        res["launch_path_probe"] = launch_path_probe(bw)
        if os.environ["READ_PROBE"] == "only":
            with open(path, "w") as f:
                json.dump(res, f, indent=1)
            return 0
    for mb in sizes_mb:
        nbytes = int(mb * 1e6) // 64 * 64
        nsets = max(2, math.ceil(ROTATE_BYTES / nbytes))
        bufs = [mx.random.randint(0, 2**31, (nbytes // 4,)).astype(mx.uint32) for _ in range(nsets)]
        mx.eval(bufs)
        want = int(np.bitwise_xor.reduce(np.array(bufs[0])))
        for label, fn in variants:
            got = int(np.bitwise_xor.reduce(np.array(fn(bufs[0]))))
            if got != want:
                print(f"{label}: WRONG XOR at {mb} MB ({got:#x} != {want:#x})", flush=True)
                res.setdefault("wrong", []).append(dict(name=label, mb=mb))
                continue
            t = timed(lambda: [fn(bufs[i % nsets]) for i in range(CALLS)])
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
    write_fits(res, pts, path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "read-floor.json"))
