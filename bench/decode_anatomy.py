"""Where a batch-1 decode step's time goes, on the device machine (diagnostic; one process per
MLX_* environment, since MLX reads MLX_MAX_OPS_PER_BUFFER / MLX_USE_CUDA_GRAPHS once).

    python3 bench/decode_anatomy.py OUT.json [--layers 32] [--tiny] [--steps 96]

On the random-weight Llama-3-8B-shaped JANG_4M model of bench/e2e_gpu.py, one sequence (prompt of
128 tokens), after warm-up:
  engine      the engine's pipelined decode: tok/s, per-step wall times (median, p10, p90) and its
              host phases (graph build / async_eval dispatch / read-back)
  step        one decode step's lazy graph: build time (Python), then eval time (synchronous, so
              dispatch + GPU with no overlap), median of 8; and the graph's op count (mx.export_to_dot)
  queued      K decode steps chained on the device (each step's argmax feeds the next) built first,
              then evaluated at once: per-step time without Python between steps (dispatch or GPU,
              whichever is slower); and the same K steps built with one step per eval
  ceiling     the bytes a step must read over the measured copy bandwidth
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx.core as mx  # noqa: E402

import e2e_gpu as E  # noqa: E402
from jang_serve.engine.engine_config import EngineConfig  # noqa: E402
from jang_serve.engine.engine_core import EngineCore  # noqa: E402
from jang_serve.engine.paged_attention import PagedBackend  # noqa: E402
from jang_serve.engine.sampling_params import SamplingParams  # noqa: E402


def pct(v, q):
    v = sorted(v)
    return v[min(len(v) - 1, int(q * len(v)))]


def engine_run(model, cfg, steps: int) -> dict:
    core = EngineCore((model, None, cfg), EngineConfig(kv_memory_gb=2.0, max_num_seqs=8,
                                                       enable_prefix_caching=False))
    sp = SamplingParams(max_tokens=steps + 16, temperature=0, ignore_eos=True)
    core.add_request("a", E.prompts_for(1, 128, cfg["vocab_size"], 3)[0], sp)
    for _ in range(16):   # prefill + warm decode steps
        core.step()
    core.pipeline.timing = {}
    mx.synchronize()
    times, n = [], 0
    t_prev = t0 = time.perf_counter()
    while core.has_work():
        ds = core.step()
        now = time.perf_counter()
        times.append(now - t_prev)
        t_prev = now
        n += sum(len(d.token_ids) for d in ds)
    wall = t_prev - t0
    tm = core.pipeline.timing
    host = {k[:-2]: round(1e3 * v / tm["steps"], 3) for k, v in tm.items() if k != "steps"} if tm.get("steps") else {}
    ms = [1e3 * t for t in times[1:-1]]
    del core
    return dict(tokens=n, tok_s=round(n / wall, 2), step_ms_median=round(statistics.median(ms), 3),
                step_ms_p10=round(pct(ms, 0.1), 3), step_ms_p90=round(pct(ms, 0.9), 3), host_ms=host,
                step_ms=[round(x, 2) for x in ms])


class StepMaker:
    """A decoding sequence's step inputs, reused to build step graphs at will (same slot every time)."""

    def __init__(self, model, cfg, nseq: int = 1):
        self.model = model
        self.core = EngineCore((model, None, cfg), EngineConfig(kv_memory_gb=2.0, max_num_seqs=max(8, nseq),
                                                                enable_prefix_caching=False))
        sp = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
        for i, p in enumerate(E.prompts_for(nseq, 128, cfg["vocab_size"], 5)):
            self.core.add_request(f"p{i}", p, sp)
        while any(q.num_computed < q.num_tokens - 1 for q in self.core.scheduler.running
                  + list(self.core.scheduler.waiting)):
            self.core.step()   # prefill until every sequence decodes
        for _ in range(4):   # warm decode steps (compiled blocks traced at this batch)
            self.core.step()
        self.core.pipeline.resolve()
        batch = self.core.scheduler.schedule()
        r = self.core.runner
        self.toks, self.pos, self.slots, self.tables, self.ql, self.cl, self.rows, self.aux, _ = r.prepare(
            batch.seqs, batch.num_new)
        self.pool = r.pool

    def step(self, tokens=None):
        """One decode step's lazy graph; returns the argmax tokens [nseq] (int32)."""
        toks = self.toks if tokens is None else tokens
        be = PagedBackend(self.pool, self.slots, self.tables, self.ql, self.cl, self.aux)
        logits = self.model(toks, self.pos, be, logits_rows=None)
        return mx.argmax(logits.astype(mx.float32), axis=-1).astype(mx.int32)


def op_count(outputs) -> dict | None:
    """Primitives in the graph of `outputs` by name (views such as Reshape/Broadcast launch no kernel)."""
    try:
        with tempfile.NamedTemporaryFile("w", suffix=".dot", delete=False) as f:
            path = f.name
        mx.export_to_dot(path, *outputs)
        text = Path(path).read_text()
        os.unlink(path)
        counts: dict[str, int] = {}
        for name in re.findall(r'label\s*="([^"]+)",\s*shape=rectangle', text):
            counts[name] = counts.get(name, 0) + 1
        return dict(total=sum(counts.values()), by_primitive=dict(sorted(counts.items(), key=lambda kv: -kv[1])))
    except Exception as e:
        return dict(error=repr(e))


def node_costs() -> dict:
    """Host cost of evaluating graph nodes on this backend: 1000 chained views (reshapes), adds and
    empty custom kernels, each chain built first and then evaluated (median of 5)."""
    a = mx.ones((4, 8))
    noop = None
    if mx.default_device() == mx.gpu and hasattr(mx.fast, "cuda_kernel"):
        noop = mx.fast.cuda_kernel(name="jang_anat_noop", input_names=["a"], output_names=["b"],
                                   source="if (threadIdx.x == 0 && blockIdx.x == 0) b[0] = a[0];")
    makers = {"reshape": lambda y, i: y.reshape(8, 4) if i % 2 == 0 else y.reshape(4, 8),
              "add": lambda y, i: y + 1.0}
    if noop is not None:
        makers["noop_kernel"] = lambda y, i: noop(inputs=[y], grid=(32, 1, 1), threadgroup=(32, 1, 1),
                                                  output_shapes=[(4, 8)], output_dtypes=[mx.float32])[0]
    pre = _precompiled_noop()
    if pre is not None:
        makers["noop_precompiled"] = lambda y, i: mx.fast.precompiled_cuda_kernel(
            name="jang_anat_noop_pre", compiled_source=pre, inputs=[y], output_shapes=[(4, 8)],
            output_dtypes=[mx.float32], scalars=[], grid=(32, 1, 1), threadgroup=(32, 1, 1))[0]
    out = {}
    for name, f in makers.items():
        ts = []
        for rep in range(6):
            y = a
            for i in range(1000):
                y = f(y, i)
            mx.synchronize()
            t = time.perf_counter()
            mx.eval(y)
            ts.append(time.perf_counter() - t)
        out[f"{name}_us_per_node"] = round(1e6 * statistics.median(ts[1:]) / 1000, 3)
    return out


def _precompiled_noop() -> bytes | None:
    """PTX of an empty kernel from nvcc, when there is one (the device image has it)."""
    import shutil
    import subprocess

    if mx.default_device() != mx.gpu or not shutil.which("nvcc"):
        return None
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "noop.cu"
        src.write_text('extern "C" __global__ void jang_anat_noop_pre(const float* a, float* b) '
                       '{ if (threadIdx.x == 0 && blockIdx.x == 0) b[0] = a[0]; }\n')
        r = subprocess.run(["nvcc", "-ptx", "-arch=sm_90", str(src), "-o", str(Path(d) / "noop.ptx")],
                           capture_output=True, text=True)
        if r.returncode:
            print("nvcc failed:", r.stderr[:300], flush=True)
            return None
        return (Path(d) / "noop.ptx").read_bytes()


def step_probe(sm: StepMaker, dot_path: str | None = None) -> dict:
    build, run = [], []
    for _ in range(9):
        mx.synchronize()
        t0 = time.perf_counter()
        tok = sm.step()
        t1 = time.perf_counter()
        mx.eval(tok, sm.pool.arrays())
        t2 = time.perf_counter()
        build.append(t1 - t0)
        run.append(t2 - t1)
    outs = [sm.step()] + sm.pool.arrays()[:2]
    ops = op_count(outs)
    if dot_path:
        mx.export_to_dot(dot_path, *outs)
    mx.eval(sm.pool.arrays())
    med = lambda v: round(1e3 * statistics.median(v[1:]), 3)  # noqa: E731
    return dict(build_ms=med(build), eval_sync_ms=med(run), graph_ops_one_step=ops)


def queued(sm: StepMaker, k: int) -> dict:
    out = {}
    for rep in range(4):
        mx.synchronize()
        t0 = time.perf_counter()
        tok = sm.toks
        for _ in range(k):
            tok = sm.step(tok)
        t1 = time.perf_counter()
        mx.eval(tok, sm.pool.arrays())
        t2 = time.perf_counter()
        if rep:   # the first repetition warms up
            out.setdefault("build_ms_per_step", []).append(1e3 * (t1 - t0) / k)
            out.setdefault("eval_ms_per_step", []).append(1e3 * (t2 - t1) / k)
        # one eval per step, the graph of the next built while the previous runs (mx.async_eval)
        mx.synchronize()
        t0 = time.perf_counter()
        tok = sm.toks
        for _ in range(k):
            tok = sm.step(tok)
            mx.async_eval(tok, sm.pool.arrays())
        mx.eval(tok)
        t3 = time.perf_counter()
        if rep:
            out.setdefault("async_ms_per_step", []).append(1e3 * (t3 - t0) / k)
    return {key: round(statistics.median(v), 3) for key, v in out.items()} | dict(k=k)


def profile_builds(sm: StepMaker, n: int) -> list[str]:
    """Where the Python side of building a step goes: cProfile over n step builds (each evaluated)."""
    import cProfile
    import io
    import pstats

    pr = cProfile.Profile()
    for _ in range(n):
        pr.enable()
        tok = sm.step()
        pr.disable()
        mx.eval(tok, sm.pool.arrays())
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(30)
    text = buf.getvalue()
    print(text, flush=True)
    return text.splitlines()[:60]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--steps", type=int, default=96)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--only-nodes", action="store_true", help="only the node costs")
    ap.add_argument("--engine-only", action="store_true", help="only the engine run (A/B of switches, one process each)")
    ap.add_argument("--dot", default=None, help="write one step's graph (mx.export_to_dot) here")
    ap.add_argument("--profile", type=int, default=0, help="cProfile N step builds (host side) and print the top")
    ap.add_argument("--nseq", type=int, default=1, help="sequences in the probed step (step/queued/profile)")
    ap.add_argument("--quant", default="jang4m", help="jang4m, or bf16 (the unquantized model)")
    ap.add_argument("--step-only", action="store_true", help="only the step probe (+ --profile): no engine run")
    a = ap.parse_args()
    cfg = dict(E.TINY if a.tiny else E.LLAMA3_8B)
    if a.layers:
        cfg["num_hidden_layers"] = a.layers
    if a.only_nodes:
        res = dict(env={k: v for k, v in os.environ.items() if k.startswith("MLX_")}, node_costs=node_costs())
        print(json.dumps(res), flush=True)
        Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
        return
    dtype = mx.bfloat16 if mx.default_device() == mx.gpu else mx.float32
    t = time.perf_counter()
    w = E.random_weights(cfg, dtype)
    model = E.ours(cfg, w, None if a.quant == "bf16" else a.quant)
    del w
    res = dict(benchmark="decode_anatomy", device=E.device_name(), mlx=mx.__version__,
               date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), commit=os.environ.get("JANG_COMMIT", ""),
               env={k: v for k, v in os.environ.items() if k.startswith(("MLX_", "JANG_"))}, layers=cfg["num_hidden_layers"],
               quant=a.quant, nseq=a.nseq,
               make_model_s=round(time.perf_counter() - t, 1))
    bw = E.copy_bandwidth(256 if a.tiny else 1024)
    sb = E.step_bytes(model, 160, cfg, 2)
    res["ceiling"] = dict(copy_GBps=round(bw / 1e9, 1), step_bytes=sb, roofline_step_ms=round(1e3 * sb / bw, 3))
    print(json.dumps(res), flush=True)
    if not (a.engine_only or a.step_only):
        res["node_costs"] = node_costs()
        print("node_costs", res["node_costs"], flush=True)
    if not a.step_only:
        res["engine"] = engine_run(model, cfg, a.steps)
        print("engine", {k: v for k, v in res["engine"].items() if k != "step_ms"}, flush=True)
    if a.engine_only:
        Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
        return
    sm = StepMaker(model, cfg, a.nseq)
    res["step"] = step_probe(sm, a.dot)
    print("step", res["step"], flush=True)
    if not a.step_only:
        res["queued"] = queued(sm, a.k)
        print("queued", res["queued"], flush=True)
    if a.profile:
        res["profile_top"] = profile_builds(sm, a.profile)
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
