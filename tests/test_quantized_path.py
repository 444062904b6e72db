"""The quantized path: our float model quantized in place by layers.quantize_model (QLinear through
kernels.qmm, experts through QSwitchLinear / mx.gather_qmm) stays close to the float model at
8 bits and drifts further at 4 bits; and per-expert quantized checkpoint tensors stack into the
same QSwitchLinear weights."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from jang_serve.engine.models.layers import QLinear, quantize_model
from jang_serve.engine.models.switch import QSwitchLinear, SwitchGLU, SwitchLinear

from test_model_parity import PROMPTS, load_ours, make_tiny_checkpoint, run_ours



def spec_for(bits: int):
    """Every linear, expert stack and the embedding at `bits`; group 64 where the input dim allows,
    else 32. The MoE router (`...gate`) stays float."""

    def spec(path: str, m: nn.Module):
        if path.endswith(".gate"):
            return None
        in_dim = m.weight.shape[-1]
        return (bits, 64 if in_dim % 64 == 0 else 32)

    return spec


def all_logits(model) -> np.ndarray:
    prefill, decode, _ = run_ours(model, PROMPTS, steps=2)
    return np.concatenate(prefill + decode, axis=0)


@pytest.fixture(scope="module", params=["llama", "qwen3_moe"])
def family_ckpt(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    make_tiny_checkpoint(request.param, path)
    return request.param, path


def dequantized_float_model(path, qmodel):
    """A float model from `path` whose weights are replaced by the dequantized weights of qmodel."""
    from mlx.utils import tree_unflatten

    model = load_ours(path)
    new = []
    for name, m in qmodel.named_modules():
        if "scales" in m:
            new.append((f"{name}.weight", mx.dequantize(m.weight, m.scales, m.biases, group_size=m.group_size,
                                                        bits=m.bits)))
    model.update(tree_unflatten(new))
    return model


def test_quantized_logits_close(family_ckpt):
    family, path = family_ckpt
    ref = all_logits(load_ours(path))
    span = float(ref.max() - ref.min())
    stats = {}
    for bits in (8, 4):
        model = load_ours(path)
        quantize_model(model, spec_for(bits))
        mods = [m for _, m in model.named_modules()]
        assert any(isinstance(m, QLinear) for m in mods)
        assert any(isinstance(m, nn.QuantizedEmbedding) for m in mods)
        if family == "qwen3_moe":
            assert sum(isinstance(m, QSwitchLinear) for m in mods) == 3  # layer 0's experts
            assert not any(type(m) is SwitchLinear for m in mods)
            assert type(model.model.layers[0].mlp.gate) is nn.Linear  # router stays float
        out = all_logits(model)
        err = np.abs(out - ref)
        stats[bits] = (float(err.mean()), float(err.max()), float((out.argmax(-1) == ref.argmax(-1)).mean()))
        # The quantized kernels compute exactly the float model on the dequantized weights.
        exact = float(np.abs(out - all_logits(dequantized_float_model(path, model))).max())
        assert exact < 1e-3, f"{family} {bits}-bit: quantized path != dequantized float model ({exact:.2e})"
        print(f"\n[quant] {family} {bits}-bit: mean |diff| {stats[bits][0]:.4f}, max {stats[bits][1]:.3f} "
              f"(logit range {span:.1f}), top-1 agree {stats[bits][2]:.0%}, vs dequantized float {exact:.1e}")
    mean8, _, agree8 = stats[8]
    # Random tiny models have near-tied logits (top-2 margins down to ~0.02), so a few top-1 flips
    # are expected even at 8 bits; the mean error is the stable measure.
    assert mean8 < 0.005 * span, f"{family}: 8-bit mean logit drift {mean8:.4f} (range {span:.1f})"
    assert agree8 >= 0.9, f"{family}: 8-bit top-1 agrees on only {agree8:.0%} of positions"
    assert stats[4][0] > 8 * mean8, f"{family}: 4-bit drift {stats[4][0]:.4f} not >> 8-bit {mean8:.4f}"


def test_per_expert_quantized_tensors_stack_like_quantize_model(tmp_path):
    """A checkpoint holding each expert quantized on its own (weight/scales/biases per expert, as in
    JANG bundles) sanitizes into the same stacked QSwitchLinear tensors quantize_model makes."""
    make_tiny_checkpoint("qwen3_moe", tmp_path)
    float_model = load_ours(tmp_path)
    ours = load_ours(tmp_path)
    quantize_model(ours, spec_for(4))
    ckpt = {}
    prefix = "model.layers.0.mlp"
    for proj in ("gate_proj", "up_proj", "down_proj"):
        w = getattr(float_model.model.layers[0].mlp.switch_mlp, proj).weight
        for e in range(w.shape[0]):
            q, s, b = mx.quantize(w[e], group_size=64 if w.shape[-1] % 64 == 0 else 32, bits=4)
            ckpt.update({f"{prefix}.experts.{e}.{proj}.weight": q, f"{prefix}.experts.{e}.{proj}.scales": s,
                         f"{prefix}.experts.{e}.{proj}.biases": b})
    stacked = ours.sanitize(ckpt)
    assert not any(".experts." in k for k in stacked)
    for proj in ("gate_proj", "up_proj", "down_proj"):
        layer = getattr(ours.model.layers[0].mlp.switch_mlp, proj)
        for name in ("weight", "scales", "biases"):
            got = stacked[f"{prefix}.switch_mlp.{proj}.{name}"]
            assert got.shape == getattr(layer, name).shape
            assert mx.array_equal(got, getattr(layer, name)), f"{proj}.{name} differs"


@pytest.mark.parametrize("tokens", [3, 40])  # 6 (token, expert) pairs: direct; 80: sorted by expert
def test_switch_glu_quantized_matches_dequantized(tokens):
    """gather_qmm experts == gather_mm on the dequantized weights, on both the direct and the
    sorted-by-expert paths; and the direct and sorted paths agree."""
    mx.random.seed(3)
    glu = SwitchGLU(64, 32, num_experts=6)
    x = mx.random.normal((tokens, 64))
    inds = mx.random.randint(0, 6, (tokens, 2))
    ref_float = glu(x, inds)
    quantize_model(glu, lambda p, m: (4, 32))
    assert isinstance(glu.gate_proj, QSwitchLinear)
    out_q = glu(x, inds)
    deq = SwitchGLU(64, 32, num_experts=6)
    for proj in ("gate_proj", "up_proj", "down_proj"):
        q = getattr(glu, proj)
        getattr(deq, proj).weight = mx.dequantize(q.weight, q.scales, q.biases, group_size=32, bits=4)
    out_deq = deq(x, inds)
    assert float(mx.abs(out_q - out_deq).max()) < 1e-4
    assert float(mx.abs(out_q - ref_float).max()) > 1e-3  # 4-bit really changed something
    # per-token loop through plain matmuls as the independent reference
    for t in range(min(tokens, 5)):
        for j in range(2):
            e = int(inds[t, j])
            w = {p: getattr(deq, p).weight[e] for p in ("gate_proj", "up_proj", "down_proj")}
            h = nn.silu(x[t] @ w["gate_proj"].T) * (x[t] @ w["up_proj"].T)
            assert float(mx.abs(h @ w["down_proj"].T - out_deq[t, j]).max()) < 1e-4
