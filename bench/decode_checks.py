"""Device-side checks of the decode fast paths that the CPU tests cannot reach (CUDA-only kernels):
the same greedy tokens from a bf16 JANG_4M-like toy model with

  base        compiled decode, one compiled call per layer, KV written by scatters
  kv_write    + the in-place KV write kernel (kernels/kv_write.py)

    python3 bench/decode_checks.py OUT.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx.core as mx  # noqa: E402

import e2e_gpu as E  # noqa: E402
from jang_serve.engine.engine_config import EngineConfig  # noqa: E402
from jang_serve.engine.engine_core import EngineCore  # noqa: E402
from jang_serve.engine.models.compiled import compile_blocks  # noqa: E402
from jang_serve.engine.sampling_params import SamplingParams  # noqa: E402
from jang_serve.kernels import backend, kv_write  # noqa: E402


def run(model, cfg, prompts, sp):
    compile_blocks(model, on=False)   # fresh traces: a trace keeps the kernels it was made with
    core = EngineCore((model, None, cfg), EngineConfig(kv_memory_gb=0.5, max_num_seqs=8, enable_prefix_caching=False))
    out = core.generate(prompts, sp)
    first = model.model.layers[0].compiled
    return out, (first.folded_calls if first is not None else 0)


def main():
    cfg = dict(E.TINY, num_hidden_layers=4)
    w = E.random_weights(cfg, mx.bfloat16)
    model = E.ours(cfg, w, "jang4m")
    prompts = E.prompts_for(5, 23, cfg["vocab_size"], 4) + E.prompts_for(1, 70, cfg["vocab_size"], 5)
    sp = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    res = {}
    backend.disable("cuda", "kv_write", "decode_checks: base run with scatters")
    res["base"] = run(model, cfg, prompts, sp)
    backend._disabled.discard(("cuda", "kv_write"))
    kv_write._ready = None
    res["kv_write"] = run(model, cfg, prompts, sp)
    base = res["base"][0]
    out = {k: dict(same_tokens=v[0] == base, folded_steps=v[1]) for k, v in res.items()}
    out["kv_write_ready"] = kv_write.ready()
    out["ok"] = all(v["same_tokens"] for k, v in out.items() if isinstance(v, dict)) and out["kv_write_ready"]
    print(json.dumps(out), flush=True)
    Path(sys.argv[1]).write_text(json.dumps(out, indent=1) + "\n")
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
