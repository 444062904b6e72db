"""The models and device measures of the end-to-end GPU bench (bench/e2e_gpu.py and the scripts that
reuse its models: decode_anatomy, decode_checks, e2e_profile): Llama-3-8B-shaped configs, random
weights generated on the device, our JANG_4M / bf16 models, copy bandwidth and the decode roofline."""

from __future__ import annotations

import platform
import subprocess

import mlx.core as mx
from mlx.utils import tree_flatten

from kernels_bench import timed  # bench/ is on sys.path: this module is imported by the bench scripts

from jang_serve.engine.models import build_model
from jang_serve.engine.models.layers import quantize_model
from jang_serve.quantize.profiles import FIXED_PROFILES
from jang_serve.quantize.roles import Role, role

LLAMA3_8B = dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rms_norm_eps=1e-5,
                 rope_theta=500000.0, max_position_embeddings=131072, tie_word_embeddings=False,
                 rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8192, "rope_type": "llama3"})
TINY = dict(LLAMA3_8B, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=1024)


# -- the device ------------------------------------------------------------------------------------
def device_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
        return out or str(mx.default_device())
    except Exception:
        return f"{mx.default_device()} ({platform.processor() or platform.machine()})"


def copy_bandwidth(mb: int) -> float:
    """Bytes read + written per second by a device copy of `mb` MB: the better of an elementwise
    multiply and a reversed-view copy, 10 queued per eval, median of 5 (bench/kernels_bench.timed)."""
    a = mx.random.uniform(shape=(mb * (1 << 20) // 2,)).astype(mx.bfloat16)
    mx.eval(a)
    makers = (lambda: [a * 1.5 for _ in range(10)], lambda: [mx.contiguous(a[::-1]) for _ in range(10)])
    return max(2 * a.nbytes / timed(make)[0] for make in makers)


# -- the models ------------------------------------------------------------------------------------
def random_weights(cfg: dict, dtype) -> dict[str, mx.array]:
    """HF-named random weights, generated on the default device layer by layer."""
    shell = build_model(cfg)  # parameters stay lazy: only their shapes are used
    out = {}
    for name, p in tree_flatten(shell.parameters()):
        if "norm" in name:
            out[name] = mx.ones(p.shape, dtype=dtype)
        else:
            out[name] = (mx.random.normal(p.shape, dtype=mx.float32) * 0.02).astype(dtype)
        mx.eval(out[name])
    return out


def ours(cfg: dict, weights: dict, quant: str | None):
    model = build_model(cfg)
    model.load_weights(list(weights.items()), strict=True)
    if quant == "jang4m":
        crit, imp, comp = FIXED_PROFILES["JANG_4M"]
        bits = {Role.CRITICAL: crit, Role.IMPORTANT: imp, Role.COMPRESS: comp}

        def spec(path, module):
            r = role(path + ".weight", tuple(module.weight.shape))
            return None if r is None else (bits[r], 64)

        quantize_model(model, spec)
    mx.eval(model.parameters())
    return model


def step_bytes(model, kv_tokens: int, cfg: dict, kv_bytes_per_value: float) -> int:
    """Bytes one decode step reads: all weights but the embedding table, plus the KV."""
    w = sum(a.nbytes for k, a in tree_flatten(model.parameters()) if "embed_tokens" not in k)
    hd = cfg["hidden_size"] // cfg["num_attention_heads"]
    kv = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * hd * kv_bytes_per_value * kv_tokens
    return int(w + kv)


def qmm_summary(model) -> dict:
    """bits -> parameter count over the model's quantized linears / embeddings."""
    out: dict[str, int] = {}
    for _, m in model.named_modules():
        if hasattr(m, "bits") and hasattr(m, "scales"):
            n = m.weight.shape[0] * m.weight.shape[1] * 32 // m.bits
            out[str(m.bits)] = out.get(str(m.bits), 0) + n
    return out
