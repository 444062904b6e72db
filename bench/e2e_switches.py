"""Kernel switches for bench/e2e_gpu.py: the route configurations it can probe, and running an engine
function under extra environment variables with the model's compiled decode blocks retraced."""

from __future__ import annotations

import json
import os

ROUTE_CONFIGS = [
    ("qgemm-2/4/8bit-gridsplit", {"JANG_QGEMM": "1", "JANG_QGEMM_BITS": "2,4,8", "JANG_QGEMM_SPLIT": "grid"}),
    ("qgemm-2/4bit-gridsplit", {"JANG_QGEMM": "1", "JANG_QGEMM_BITS": "2,4", "JANG_QGEMM_SPLIT": "grid"}),
    ("qgemm-2/4/8bit-nosplit", {"JANG_QGEMM": "1", "JANG_QGEMM_BITS": "2,4,8", "JANG_QGEMM_SPLIT": "1"}),
    ("mlx-quantized_matmul", {"JANG_QGEMM": "0", "JANG_QGEMM_BITS": "2,4,8", "JANG_QGEMM_SPLIT": "grid"}),
]
if os.environ.get("E2E_ROUTES"):   # a JSON list of [name, {env}] pairs replaces them (e.g. qgemm v2 vs v3)
    ROUTE_CONFIGS = [tuple(c) for c in json.loads(os.environ["E2E_ROUTES"])]


# Ablations of this session's switches, each an e2e run of the JANG model with one switch flipped
# (bench/e2e_gpu.py adds batch1/ours-jang4m-<tag> and batched/ours-jang4m-<tag> runs for them).
ABLATIONS_BATCH1 = {
    "nokvwrite": {"JANG_KV_WRITE": "0"},      # two scatters per layer instead of the in-place KV write
    "pagedv1": {"JANG_PAGED_V2": "0"},        # the two-launch paged decode
}
ABLATIONS_BATCHED = {
    "nodequant": {"JANG_DEQUANT": "0"},       # mx.dequantize before cuBLAS (prefill) instead of dequant_cuda
}


class env_set:
    def __init__(self, env):
        self.env, self.old = env, {}

    def __enter__(self):
        self.old = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)

    def __exit__(self, *exc):
        for k, v in self.old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# Every environment switch a run may flip: a compiled decode trace keeps the kernels it was made with,
# so a model's traces are dropped whenever these differ from the ones it was traced under.
SWITCHES = sorted({k for _, env in ROUTE_CONFIGS for k in env} | {k for env in ABLATIONS_BATCH1.values() for k in env}
                  | {k for env in ABLATIONS_BATCHED.values() for k in env} | {"JANG_FUSED_GEMV", "JANG_QGEMM_IMPL",
                                                                                "JANG_QGEMM3_MIN_ROWS_8BIT"})
_traced_under: dict[int, tuple] = {}


def match_traces(model) -> None:
    """Drop `model`'s compiled decode blocks if the switches changed since they were traced (call at the
    start of every engine run). A warm-up run and its timed twin share one setting, so the timed run
    replays the warm-up's traces instead of tracing again."""
    from jang_serve.engine.models.compiled import compile_blocks

    key = tuple(os.environ.get(k) for k in SWITCHES)
    if _traced_under.get(id(model)) != key:
        compile_blocks(model, on=False)
        _traced_under[id(model)] = key


def with_env(env, fn, model, *a, **kw):
    """fn(model, ...) under extra environment variables (kernel switches); fn must call match_traces
    (run_ours and probe_step do), so the switch reaches the traced decode steps."""
    with env_set(env):
        return fn(model, *a, **kw)


def no_fused(fn, model, *a, **kw):
    """fn with the fused norm/RoPE/SwiGLU/residual GEMVs off (JANG_FUSED_GEMV=0)."""
    return with_env({"JANG_FUSED_GEMV": "0"}, fn, model, *a, **kw)


def no_qgemm(fn, model, *a, **kw):
    """fn with the tiled GEMM off (5-191 rows through mx.quantized_matmul)."""
    return with_env({"JANG_QGEMM": "0"}, fn, model, *a, **kw)
