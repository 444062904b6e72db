"""The read floor without MLX: bench/read_floor.py's kernels (the same source text) compiled by nvcc through CuPy
and launched by plain CUDA, so the fixed cost per call that MLX's launch path adds can be told from the GPU's own.

    python3 bench/read_floor_raw.py OUT.json          (on the device; CuPy and nvcc are in its image)
    python3 bench/read_floor_raw.py --source          (print the CUDA source; compile it here with nvcc)

Per size and kernel, 100 launches over buffers rotated past 8x L2, timed with CUDA events (median of 5): on one
stream, and as one captured CUDA graph (a chain: each launch after the previous one, as MLX's graphs order
dependent work). Sizes 18-132 MB give each kernel's fixed cost per call (intercept) and marginal bandwidth.
"""

from __future__ import annotations

import datetime
import math
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))
from read_floor import BULK_HEADER, BULK_SOURCE, BULK_VARIANTS, SOURCE, bulk_smem, write_fits  # noqa: E402

CALLS, REPS, ROTATE_BYTES, SMS = 100, 5, 400e6, 132

# (label, kernel name, template constants, blocks, threads, dynamic shared memory)
KERNELS = [("grid-stride x4", "rf_plain", dict(UNROLL=4, CHUNKED="false"), SMS * 8, 256, 0),
           ("chunked x8, 4 blocks/SM", "rf_chunk", dict(UNROLL=8, CHUNKED="true"), SMS * 4, 256, 0)]
KERNELS += [(f"bulk {st}x{ch // 1024} KB, {bps} block(s)/SM", f"rf_bulk_{i}", dict(STAGES=st, CHUNK=ch), SMS * bps,
             256, bulk_smem(st, ch)) for i, (st, ch, bps) in enumerate(BULK_VARIANTS)]


def source() -> str:
    """One extern "C" kernel per entry of KERNELS, each the MLX body with its template constants fixed."""
    parts = ["#include <cstdint>\n#include <cstddef>\n", BULK_HEADER]
    for _label, name, consts, *_ in KERNELS:
        body = BULK_SOURCE if name.startswith("rf_bulk") else SOURCE
        cdecl = "".join(f"  constexpr auto {k} = {v};\n" for k, v in consts.items())
        parts.append(f'extern "C" __global__ void {name}(const uint32_t* __restrict__ a, uint32_t* out, '
                     f'long long nwords) {{\n  const long long a_shape[1] = {{nwords}};\n{cdecl}{body}}}\n')
    return "\n".join(parts)


def main(path):
    import cupy as cp
    import numpy as np

    mod = cp.RawModule(code=source(), backend="nvcc", options=("-arch=sm_90", "-std=c++17"))
    dev = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                         text=True).stdout.strip()
    res = dict(benchmark="read_floor_raw", device=dev, cupy=cp.__version__,
               cuda_runtime=cp.cuda.runtime.runtimeGetVersion(),
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               method=__doc__.split("\n\n")[2], rows=[], fits={})
    stream = cp.cuda.Stream(non_blocking=True)
    e0, e1 = cp.cuda.Event(), cp.cuda.Event()
    pts: dict = {}
    for mb in tuple(int(m) for m in os.environ.get("READ_MB", "18,33,66,132").split(",")):
        nbytes = int(mb * 1e6) // 64 * 64
        nsets = max(2, math.ceil(ROTATE_BYTES / nbytes))
        with stream:
            bufs = [cp.random.randint(0, 2**31, nbytes // 4, dtype=cp.int64).astype(cp.uint32) for _ in range(nsets)]
        stream.synchronize()
        want = int(np.bitwise_xor.reduce(cp.asnumpy(bufs[0])))
        for label, name, _c, blocks, threads, smem in KERNELS:
            k = mod.get_function(name)
            if smem > 48 * 1024:
                k.max_dynamic_shared_size_bytes = smem
            out = cp.zeros(blocks * threads // 32, cp.uint32)
            nw = np.int64(nbytes // 4)

            def launch(i, k=k, out=out, blocks=blocks, threads=threads, smem=smem):
                k((blocks,), (threads,), (bufs[i % nsets], out, nw), shared_mem=smem)

            with stream:
                launch(0)
            stream.synchronize()
            got = int(np.bitwise_xor.reduce(cp.asnumpy(out)))
            if got != want:
                print(f"{label}: WRONG XOR at {mb} MB", flush=True)
                res.setdefault("wrong", []).append(dict(name=label, mb=mb))
                continue
            with stream:
                stream.begin_capture()
                for i in range(CALLS):
                    launch(i)
                graph = stream.end_capture()
            for mode in ("stream", "graph"):
                ts = []
                for _ in range(REPS + 1):
                    with stream:
                        e0.record(stream)
                        if mode == "graph":
                            graph.launch(stream)
                        else:
                            for i in range(CALLS):
                                launch(i)
                        e1.record(stream)
                    e1.synchronize()
                    ts.append(cp.cuda.get_elapsed_time(e0, e1) * 1e3 / CALLS)
                us = statistics.median(ts[1:])
                key = f"{label}, {mode}"
                res["rows"].append(dict(name=key, mb=mb, bytes=nbytes, us=round(us, 2),
                                        GBps=round(nbytes / us / 1e3, 1)))
                pts.setdefault(key, []).append((nbytes, us))
                print(f"{key:45s} {mb:4d} MB {us:7.2f} us {nbytes / us / 1e3:7.1f} GB/s", flush=True)
        del bufs
    write_fits(res, pts, path)
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--source"]:
        print(source())
        sys.exit(0)
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "read-floor-raw.json"))
