"""A follower rank (1..N-1) of a tensor-parallel engine; rank 0 starts it (launch.Followers).

    python -m jang_serve.engine.distributed.worker --model PATH --dtype float32 \\
        --engine-config '{...EngineConfig...}' --rank 1 --size 2 --backend ring

Loads only its shard of the model (load_model(shard=...)), prints READY on its control pipe, joins the group,
builds its own KV pool (same block count as every rank), then replays rank 0's step plans until
its stdin reaches EOF (rank 0 stopped or died). It never schedules or samples anything itself.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from dataclasses import replace


def _watch_parent(parent: int) -> None:
    """Exit if rank 0 disappears while this rank is stuck inside a collective."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(3)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="jang-serve-tp-worker")
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--engine-config", required=True, help="EngineConfig fields as JSON")
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--backend", default="ring", choices=("ring", "nccl"))
    args = ap.parse_args(argv)

    # stdout is the control pipe to rank 0: keep it for READY, send everything else to stderr.
    control = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: rank 0 stops us (EOF)

    from jang_serve.engine.engine_config import EngineConfig
    from jang_serve.engine.engine_core import model_dtype
    from jang_serve.engine.kv_pool import KVPool
    from jang_serve.engine.loader import load_model
    from jang_serve.engine.model_runner import ModelRunner
    from jang_serve.engine.models.dense import densify_for_device
    from jang_serve.engine.models.layers import fuse_projections

    from .launch import READY, init_group
    from .plan import recv_plan
    from .shard_load import attach_group
    from .synthetic import is_synthetic, load_synthetic
    from .tp_engine import agree_num_blocks

    tag = f"[tp rank {args.rank}]"
    if is_synthetic(args.model):  # a random-weight benchmark model: this rank's values only
        loaded = load_synthetic(args.model, args.dtype, shard=(args.rank, args.size))
    else:
        loaded = load_model(args.model, dtype=args.dtype, shard=(args.rank, args.size))  # only this rank's slices
    control.write(READY + "\n")
    control.flush()
    contact = {"hostfile": os.environ.get("MLX_HOSTFILE"), "nccl_port": os.environ.get("NCCL_PORT")}
    group = init_group(args.rank, args.size, args.backend, contact)
    model = loaded.model
    attach_group(model, group)
    cfg = EngineConfig(**json.loads(args.engine_config))
    dtype = model_dtype(model)
    n = agree_num_blocks(model, cfg, dtype, group)
    runner = ModelRunner(model, KVPool.for_model(model, replace(cfg, num_blocks=n), dtype, loaded.tokenizer))
    densify_for_device(model, dtype, cfg.cpu_dense_gb)  # as EngineCore does on rank 0
    if cfg.on_gpu_by_default("fuse_projections"):  # as EngineCore does on rank 0
        fuse_projections(model)
    steps = 0
    stdin = sys.stdin.buffer
    while True:
        if not stdin.read(1):  # EOF: rank 0 closed the pipe (shutdown) or died
            break
        plan = recv_plan(group)
        if plan is None:
            break
        if plan.copies:
            runner.pool.copy_blocks(plan.copies)
        runner.execute(*plan.arrays())
        steps += 1
    print(f"{tag} stopping after {steps} steps", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    try:
        code = main()
    except Exception as e:  # a clear last line in the log, then a non-zero status rank 0 reports
        print(f"[tp worker] failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        os._exit(1)
    os._exit(code)
