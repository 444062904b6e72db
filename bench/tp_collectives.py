"""All-sum latency over N ranks: the collective tensor parallelism runs twice per decoder layer
(plus one for the embedding and two small plan broadcasts per step), so its latency at decode sizes
bounds the tensor-parallel decode speed.

    python3 bench/tp_collectives.py OUT.json --tp N [--hidden 8192] [--rows 1,64,2048] [--iters 200]
    (or the entry `collectives:N` of bench/tp_gpu.py --plan)

Ranks are started the way the engine starts them (engine/distributed/launch.py: NCCL with one GPU
per rank and NVLink multicast off on CUDA, the ring backend over loopback on the CPU). For each
[rows, hidden] tensor (bf16 on a GPU, float32 on the CPU):
  synced   all_sum then eval, one at a time (a host round trip each)
  chained  `iters` all_sums in one graph, evaluated once (how a decode step issues them)
Reported in microseconds per all_sum (median of 3 repeats) and the bus bandwidth of the chained
run (2 (N-1)/N x bytes per all_sum / time, NCCL's convention).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from importlib.metadata import version

os.environ.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")

import mlx.core as mx  # noqa: E402

from jang_serve.engine.distributed.launch import default_backend, init_group, make_contact, rank_env  # noqa: E402


def measure(group, rows: list[int], hidden: int, iters: int) -> dict:
    dtype = mx.bfloat16 if mx.default_device() == mx.gpu else mx.float32
    out, size = {}, group.size()
    for r in rows:
        x = mx.ones((r, hidden), dtype)
        for _ in range(5):
            mx.eval(mx.distributed.all_sum(x, group=group))
        synced, chained = [], []
        for _ in range(3):
            t = time.perf_counter()
            for _ in range(iters):
                mx.eval(mx.distributed.all_sum(x, group=group))
            synced.append((time.perf_counter() - t) / iters)
            y = x
            mx.synchronize()
            t = time.perf_counter()
            for _ in range(iters):
                y = mx.distributed.all_sum(y, group=group) * (1.0 / size)
            mx.eval(y)
            mx.synchronize()
            chained.append((time.perf_counter() - t) / iters)
        c = statistics.median(chained)
        out[str(r)] = dict(bytes=x.nbytes, synced_us=round(1e6 * statistics.median(synced), 1),
                           chained_us=round(1e6 * c, 1),
                           chained_busbw_GBps=round(2 * (size - 1) / size * x.nbytes / c / 1e9, 2))
    return out


def _exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(3)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--tp", type=int, default=2)
    gpu = mx.default_device() == mx.gpu  # defaults: Llama-3-70B's hidden size on a GPU, a quick look on the CPU
    ap.add_argument("--hidden", type=int, default=8192 if gpu else 256)
    ap.add_argument("--rows", default="1,64,2048" if gpu else "1,16")
    ap.add_argument("--iters", type=int, default=200 if gpu else 20)
    ap.add_argument("--rank", type=int, default=0, help="(internal) a follower's rank")
    ap.add_argument("--contact", default="", help="(internal) rank 0's contact JSON")
    ap.add_argument("--backend", default=None)
    a = ap.parse_args()
    rows = [int(r) for r in a.rows.split(",")]
    backend = a.backend or default_backend()
    if a.rank:  # a follower: join, measure, exit (also if rank 0 is killed while we wait in a collective)
        threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
        measure(init_group(a.rank, a.tp, backend, json.loads(a.contact)), rows, a.hidden, a.iters)
        return
    contact = make_contact(a.tp, backend)
    procs = []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
    for rank in range(1, a.tp):
        env = dict(os.environ, **rank_env(rank, a.tp, backend, contact))
        if backend == "nccl":  # one GPU per rank, as launch.Followers does
            env["CUDA_VISIBLE_DEVICES"] = visible[rank] if len(visible) > rank and visible[0] else str(rank)
        procs.append(subprocess.Popen([sys.executable, __file__, os.devnull, "--tp", str(a.tp), "--hidden",
                                       str(a.hidden), "--rows", a.rows, "--iters", str(a.iters), "--rank",
                                       str(rank), "--contact", json.dumps(contact), "--backend", backend], env=env))
    try:
        res = measure(init_group(0, a.tp, backend, contact), rows, a.hidden, a.iters)
    finally:
        codes = [p.wait(timeout=120) for p in procs]
        if contact.get("hostfile") and os.path.exists(contact["hostfile"]):
            os.unlink(contact["hostfile"])
    from e2e_gpu import device_name

    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    doc = dict(benchmark="tp_collectives", date=now,
               device=device_name(), versions=dict(mlx=version("mlx"), python=platform.python_version()),
               tp=a.tp, backend=backend, hidden=a.hidden, iters=a.iters, follower_exit=codes,
               machine_shared=mx.default_device() != mx.gpu, all_sum=res)
    with open(a.out, "w") as f:
        f.write(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc["all_sum"]), flush=True)


if __name__ == "__main__":
    main()
