"""Tensor parallelism on several GPUs (NCCL) or, as a smoke test, on the CPU (ring backend).

    python3 bench/tp_gpu.py OUT.json --plan llama3-8b:1,llama3-8b:2,llama3-70b:2   # one process per entry
                                            (entry collectives:N: all_sum latency, bench/tp_collectives.py)
    python3 bench/tp_gpu.py OUT.json --shape llama3-70b --tp 4                      # one configuration

Each configuration is a random-weight model of that shape at JANG_4M (attention + lm_head 8 bits,
embedding and MLP 4 bits, group 64, by quantize's roles), generated directly as each rank's shard
(engine/distributed/synthetic.py: no rank ever holds, and no disk ever stores, the whole model).
tp 1 runs the plain EngineCore on one device; tp N starts the real tensor-parallel engine
(`start_tp_engine`: rank 0 here, ranks 1..N-1 as worker processes, one GPU each, NCCL with NVLink
multicast off). Runs, each after an identical warm-up run on other prompts (JIT compiles):
  batch1   one prompt of --prompt tokens, --gen1 greedy tokens: decode tok/s after the first token
  batched  --conc prompts submitted together, --genb tokens each: aggregate and decode-phase tok/s
Roofline (per rank, communication ignored): bytes one decode step reads on a rank (its weights
except the embedding table, plus its KV at the mean context) over rank 0's measured copy bandwidth.
The synthetic weights are the same function of (name, index) for every split, so tp 1 and tp N
compute the same model: the plan reports how many greedy tokens agree (bf16 sums in a different
order may flip near-ties on a GPU; float32 on the CPU agrees exactly).
Results are written after every section, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

# NVLink multicast off before anything can start NCCL (shared GPU hosts require it); inherited by the ranks.
os.environ.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")

import mlx.core as mx  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from e2e_baseline import summarize  # noqa: E402
from e2e_gpu import LLAMA3_8B, copy_bandwidth, device_name, prompts_for  # noqa: E402

LLAMA3_70B = dict(LLAMA3_8B, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                  num_attention_heads=64, num_key_value_heads=8)
TINY = dict(LLAMA3_8B, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=1024)
SHAPES = {"llama3-70b": LLAMA3_70B, "llama3-8b": LLAMA3_8B, "tiny": TINY}
TRI = {"auto": None, "on": True, "off": False}


def log(*a):
    print(*a, flush=True)


def jang_modules(cfg: dict, profile: str, group: int = 64) -> dict[str, tuple[int, int]]:
    """module path -> (bits, group) of a fixed JANG profile, by quantize's tensor roles."""
    import mlx.nn as nn

    from jang_serve.engine.models import build_model
    from jang_serve.quantize.profiles import FIXED_PROFILES
    from jang_serve.quantize.roles import Role, role

    crit, imp, comp = FIXED_PROFILES[profile]
    bits = {Role.CRITICAL: crit, Role.IMPORTANT: imp, Role.COMPRESS: comp}
    out = {}
    for path, m in build_model(cfg).named_modules():  # lazy: shapes only
        if isinstance(m, (nn.Linear, nn.Embedding)):
            r = role(path + ".weight", tuple(m.weight.shape))
            if r is not None:
                out[path] = (bits[r], group)
    return out


def step_bytes(model, kv_tokens: int, dtype_size: int) -> int:
    """Bytes one decode step reads on this rank: its weights but the embedding table, plus its KV."""
    w = sum(a.nbytes for k, a in tree_flatten(model.parameters()) if "embed_tokens" not in k)
    kv = 2 * model.num_layers * model.kv_heads * model.head_dim * dtype_size * kv_tokens
    return int(w + kv)


def run_core(core, prompts, gen) -> tuple[dict, list[int]]:
    """Greedy generation of `prompts` through an EngineCore (rank 0's, under tensor parallelism)."""
    from jang_serve.engine.sampling_params import SamplingParams

    sp = SamplingParams(max_tokens=gen, temperature=0, ignore_eos=True)
    for i, p in enumerate(prompts):
        core.add_request(f"r{time.monotonic_ns()}-{i}", p, sp)
    first, count, steps, toks = {}, 0, [], []
    mx.synchronize()
    t0 = time.perf_counter()
    while core.has_work():
        ds = core.step()
        now = time.perf_counter()
        count += sum(len(d.token_ids) for d in ds)
        steps.append((now, sum(len(d.token_ids) for d in ds)))
        for d in ds:
            if d.token_ids:
                first.setdefault(d.request_id, now)
            if d.request_id.endswith("-0"):
                toks += d.token_ids
    return summarize(t0, first, steps, count, len(prompts), gen), toks


def run_one(a) -> dict:
    from jang_serve.engine.distributed import start_tp_engine
    from jang_serve.engine.distributed.launch import default_backend
    from jang_serve.engine.distributed.synthetic import load_synthetic, write_spec
    from jang_serve.engine.engine_config import EngineConfig
    from jang_serve.engine.engine_core import EngineCore

    cfg = SHAPES[a.shape]
    on_gpu = mx.default_device() == mx.gpu
    dtype = getattr(mx, a.dtype) if a.dtype else (mx.bfloat16 if on_gpu else mx.float32)
    res = dict(benchmark="tp_gpu", date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               device=device_name(), versions=dict(mlx=version("mlx"), python=platform.python_version()),
               commit=a.commit, note=a.note, shape=a.shape, tp=a.tp, profile=a.profile, dtype=str(dtype),
               backend=default_backend() if a.tp > 1 else None,
               env={k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST",
                                                    "NVSHMEM_DISABLE_NVLS", "CUDA_VISIBLE_DEVICES")},
               machine_shared=not on_gpu,  # the CPU smoke test runs on a machine shared with other jobs
               settings=dict(prompt_tokens=a.prompt, gen_batch1=a.gen1, gen_batched=a.genb, concurrency=a.conc,
                             kv_gb_per_rank=a.kv_gb, max_num_batched_tokens=a.budget, greedy=True, ignore_eos=True,
                             async_decode=a.async_decode, compile_decode=a.compile),
               runs={}, timings_s={})
    out = Path(a.out)

    def save():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1) + "\n")

    bw = copy_bandwidth(512 if on_gpu else 8)
    res["copy_bandwidth_GBps"] = round(bw / 1e9, 1)
    spec = write_spec(Path(tempfile.mkdtemp(prefix="jang-tp-bench-")) / a.shape, cfg,
                      jang_modules(cfg, a.profile), seed=a.seed)
    ecfg = EngineConfig(kv_memory_gb=a.kv_gb, max_num_batched_tokens=a.budget, max_num_seqs=max(64, a.conc),
                        enable_prefix_caching=False, async_decode=TRI[a.async_decode], compile_decode=TRI[a.compile])
    mx.reset_peak_memory()
    t = time.perf_counter()
    engine = None
    if a.tp == 1:
        core = EngineCore(load_synthetic(spec, dtype), ecfg)
    else:  # every rank generates only its own shard
        engine = start_tp_engine(load_synthetic(spec, dtype, shard=(0, a.tp)), ecfg, a.tp, ready_timeout=900)
        core = engine.core
        res["shard_rank0"] = engine.shard_info
    res["timings_s"]["start"] = round(time.perf_counter() - t, 1)
    model = core.model
    wbytes = sum(x.nbytes for _, x in tree_flatten(model.parameters()))
    b1, bb = step_bytes(model, a.prompt + a.gen1 // 2, dtype.size), \
        step_bytes(model, a.conc * (a.prompt + a.genb // 2), dtype.size)
    res["model"] = dict(weight_bytes_rank0=wbytes, peak_memory_rank0_after_start_incl_kv=mx.get_peak_memory(),
                        kv_blocks=core.pool.num_blocks, step_bytes_batch1_rank0=b1, step_bytes_batched_rank0=bb,
                        roofline_tok_s_batch1=round(bw / b1, 1), roofline_tok_s_batched=round(a.conc * bw / bb, 1),
                        collectives_per_step=dict(all_sum=2 * cfg["num_hidden_layers"] + 1 + 2, all_gather=1)
                        if a.tp > 1 else None)
    save()
    log(a.shape, "tp", a.tp, json.dumps(res["model"]))
    vocab = cfg["vocab_size"]
    plan = [("batch1", prompts_for(1, a.prompt, vocab, 3), prompts_for(1, a.prompt, vocab, 1), a.gen1),
            ("batched", prompts_for(a.conc, a.prompt, vocab, 4), prompts_for(a.conc, a.prompt, vocab, 2), a.genb)]
    try:
        for name, warm, prompts, gen in plan:
            t = time.perf_counter()
            run_core(core, warm, gen)
            res["timings_s"][name + "/warmup"] = round(time.perf_counter() - t, 1)
            r, toks = run_core(core, prompts, gen)
            roof = res["model"]["roofline_tok_s_" + name]
            r["roofline_tok_s"] = roof
            r["pct_of_roofline"] = round(100 * r["decode_tok_s"] / roof, 1) if r.get("decode_tok_s") else None
            r["first_sequence_tokens"] = toks
            res["runs"][name] = r
            log(name, json.dumps({k: v for k, v in r.items() if k != "first_sequence_tokens"}))
            save()
    finally:
        if engine is not None:
            engine.shutdown()
    return res


def run_plan(a) -> dict:
    """Every `shape:tp` entry in its own process (one tensor-parallel group per process), merged."""
    res = dict(benchmark="tp_gpu plan", plan=a.plan, date=datetime.datetime.now(datetime.timezone.utc)
               .isoformat(timespec="seconds"), configs={}, scaling={})
    out = Path(a.out)
    deadline = time.monotonic() + a.total
    for entry in a.plan.split(","):
        shape, tp = entry.split(":")
        left = deadline - time.monotonic()
        if left < 30:  # the device call's limit: record what was not run
            res["configs"][entry] = dict(exit="skipped: the plan's --total ran out")
            out.write_text(json.dumps(res, indent=1) + "\n")
            continue
        part = out.with_name(f"{out.stem}-{shape}-tp{tp}.json")
        if shape == "collectives":  # all_sum latency alone (bench/tp_collectives.py, its defaults)
            cmd = [sys.executable, str(Path(__file__).with_name("tp_collectives.py")), str(part), "--tp", tp]
        else:
            cmd = [sys.executable, __file__, str(part), "--shape", shape, "--tp", tp] + a.passthrough
        log("==", " ".join(cmd))
        t = time.perf_counter()
        try:
            p = subprocess.run(cmd, timeout=min(a.timeout, left))
            code = p.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
        got = json.loads(part.read_text()) if part.exists() else {}
        got["exit"], got["wall_s"] = code, round(time.perf_counter() - t, 1)
        res["configs"][entry] = got
        res["device"] = got.get("device", res.get("device"))
        res["versions"] = got.get("versions", res.get("versions"))
        one = res["configs"].get(f"{shape}:1")
        if one and tp != "1":
            res["scaling"][entry] = _scaling(one, got)
        out.write_text(json.dumps(res, indent=1) + "\n")
    return res


def _scaling(one: dict, n: dict) -> dict:
    out = {}
    for run in ("batch1", "batched"):
        a, b = one.get("runs", {}).get(run, {}), n.get("runs", {}).get(run, {})
        for key in ("decode_tok_s", "tok_s"):
            if a.get(key) and b.get(key):
                out[f"{run}_{key}_vs_tp1"] = round(b[key] / a[key], 2)
        ta, tb = a.get("first_sequence_tokens") or [], b.get("first_sequence_tokens") or []
        if ta and tb:
            same = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), min(len(ta), len(tb)))
            out[f"{run}_greedy_tokens_agreeing"] = f"{same}/{min(len(ta), len(tb))}"
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--plan", default="", help="comma list of shape:tp, each run in its own process")
    ap.add_argument("--timeout", type=float, default=540, help="seconds per plan entry")
    ap.add_argument("--total", type=float, default=560, help="seconds for the whole plan (a device call's limit)")
    ap.add_argument("--shape", default="llama3-70b", choices=sorted(SHAPES))
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--profile", default="JANG_4M")
    ap.add_argument("--dtype", default=None, help="bfloat16 (GPU default) or float32 (CPU default)")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen1", type=int, default=128)
    ap.add_argument("--genb", type=int, default=64)
    ap.add_argument("--conc", type=int, default=64)
    ap.add_argument("--budget", type=int, default=2048, help="max_num_batched_tokens")
    ap.add_argument("--kv-gb", type=float, default=8.0, help="KV pool per rank")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--async-decode", choices=("auto", "on", "off"), default="off",
                    help="pipelined decode of tp 1 (tensor parallelism always steps synchronously, so off "
                         "compares like with like)")
    ap.add_argument("--compile", choices=("auto", "on", "off"), default="off",
                    help="compiled decode blocks of tp 1 (tensor-parallel shards stay eager, so off compares "
                         "like with like)")
    ap.add_argument("--commit", default=os.environ.get("JANG_COMMIT", ""))
    ap.add_argument("--note", default="")
    a, rest = ap.parse_known_args()
    if rest:
        ap.error(f"unknown arguments {rest}")
    if a.plan:
        skip = {"--plan", "--timeout", "--total", "--shape", "--tp"}
        argv, a.passthrough, i = sys.argv[2:], [], 0
        while i < len(argv):  # the options every entry shares
            opt = argv[i].split("=")[0]
            take = 1 if "=" in argv[i] else 2
            if opt not in skip:
                a.passthrough += argv[i:i + take]
            i += take
        run_plan(a)
    else:
        run_one(a)


if __name__ == "__main__":
    main()
