"""Logit parity with transformers for every model family.

For each family a tiny random model (float32, 2 layers, hidden 64, vocab 128, fixed seed) is
built with transformers, saved with save_pretrained as safetensors, loaded back by our loader and
run on a flat batch of 3 prompts of different lengths through ContiguousBackend, then 2 decode
steps. Logits must match transformers' own (run per sequence, no padding) within 1e-3.

Weights are re-drawn larger than transformers' init (std 0.02 gives near-zero logits that would
make any tolerance meaningless): matrices ~ N(0, 0.15^2), norms/biases = init + N(0, 0.1^2).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
import transformers

from jang_serve.engine.attention import ContiguousBackend, ContiguousKV

TOL = 1e-3
PROMPTS = [[5, 17, 99, 3, 42, 8, 77, 12, 64, 31, 2], [9, 100, 4, 55, 23], list(range(20, 36))]
BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def family_configs() -> dict:
    t = transformers
    return {
        "llama": (t.LlamaConfig, t.LlamaForCausalLM, dict(rope_theta=5000.0, tie_word_embeddings=False)),
        # window 6 is smaller than the longest prompt (16) and the decode steps
        "mistral": (t.MistralConfig, t.MistralForCausalLM,
                    dict(sliding_window=6, head_dim=16, rope_theta=20000.0, tie_word_embeddings=False)),
        "qwen2": (t.Qwen2Config, t.Qwen2ForCausalLM, dict(rope_theta=30000.0, tie_word_embeddings=True)),
        "qwen3": (t.Qwen3Config, t.Qwen3ForCausalLM,
                  dict(head_dim=32, rope_theta=40000.0, tie_word_embeddings=False)),
        "gemma3_text": (t.Gemma3TextConfig, t.Gemma3ForCausalLM,
                        dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=6,
                             layer_types=["sliding_attention", "full_attention"], rope_theta=50000.0,
                             rope_local_base_freq=100.0, rope_scaling={"rope_type": "linear", "factor": 2.0})),
        "phi3": (t.Phi3Config, t.Phi3ForCausalLM,
                 dict(partial_rotary_factor=0.5, rope_theta=7000.0, tie_word_embeddings=False)),
        # LongRoPE: original context 10, so prompts of 11 and 16 tokens take the long factors
        # and the 5-token one the short factors, as transformers chooses per forward.
        "phi3_longrope": (t.Phi3Config, t.Phi3ForCausalLM,
                          dict(partial_rotary_factor=0.5, max_position_embeddings=40,
                               original_max_position_embeddings=10, tie_word_embeddings=False,
                               rope_scaling={"rope_type": "longrope", "short_factor": [1.0, 1.5, 2.0, 3.0],
                                             "long_factor": [2.0, 4.0, 8.0, 16.0]})),
        "qwen3_moe": (t.Qwen3MoeConfig, t.Qwen3MoeForCausalLM,
                      dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
                           mlp_only_layers=[1], head_dim=16, tie_word_embeddings=False)),
        "mixtral": (t.MixtralConfig, t.MixtralForCausalLM,
                    dict(num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False)),
    }


def make_tiny_checkpoint(family: str, out_dir, seed: int = 0):
    """Build a tiny random transformers model of `family`, save it to out_dir (unless None);
    return the model."""
    cfg_cls, model_cls, extra = family_configs()[family]
    torch.manual_seed(seed)
    cfg = cfg_cls(**{**BASE, **extra})
    cfg._attn_implementation = "eager"
    hf = model_cls(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.15)
            else:
                p.add_(torch.randn_like(p) * 0.1)
    if out_dir is not None:
        hf.save_pretrained(out_dir, safe_serialization=True)
    return hf


def load_ours(path):
    """Our model from a saved checkpoint folder, through the real loader."""
    from jang_serve.engine.loader import load_model

    loaded = load_model(str(path), dtype="float32")
    assert loaded.format == "hf" and loaded.quantization is None
    return loaded.model


def run_ours(model, prompts, steps: int):
    """Prefill all prompts as one flat batch, then `steps` greedy decode steps.
    Returns (prefill logits per prompt [L, V], decode logits per step [B, V], generated tokens)."""
    caches = [ContiguousKV(model.num_layers) for _ in prompts]
    toks = mx.array(sum(prompts, []), dtype=mx.int32)
    pos = mx.array(sum([list(range(len(p))) for p in prompts], []), dtype=mx.int32)
    logits = model(toks, pos, ContiguousBackend(caches, [len(p) for p in prompts])).astype(mx.float32)
    out, off = [], 0
    for p in prompts:
        out.append(np.array(logits[off:off + len(p)]))
        off += len(p)
    seqs = [list(p) for p in prompts]
    last = np.stack([o[-1] for o in out])
    decode = []
    for _ in range(steps):
        nxt = [int(i) for i in last.argmax(-1)]
        for s, t in zip(seqs, nxt):
            s.append(t)
        pos = mx.array([len(s) - 1 for s in seqs], dtype=mx.int32)
        last = np.array(model(mx.array(nxt, dtype=mx.int32), pos, ContiguousBackend(caches, [1] * len(seqs))).astype(mx.float32))
        decode.append(last)
    return out, decode, seqs


def compare(hf, model, prompts=PROMPTS, steps: int = 2) -> tuple[float, float]:
    """Max abs logit difference vs transformers over prefill and decode; also the logit range."""
    prefill, decode, seqs = run_ours(model, prompts, steps)
    diff, span = 0.0, 0.0
    with torch.no_grad():
        for i, s in enumerate(seqs):
            ref = hf(torch.tensor([s])).logits[0].float().numpy()
            n = len(prompts[i])
            diff = max(diff, float(np.abs(prefill[i] - ref[:n]).max()))
            for j in range(steps):
                diff = max(diff, float(np.abs(decode[j][i] - ref[n + j]).max()))
            span = max(span, float(ref.max() - ref.min()))
    return diff, span


@pytest.mark.parametrize("family", list(family_configs()))
def test_parity(family, tmp_path):
    hf = make_tiny_checkpoint(family, tmp_path)
    model = load_ours(tmp_path)
    diff, span = compare(hf, model)
    # bfloat16 (the GPU default) runs every family's kernels too and stays near float32
    ref = np.concatenate(run_ours(model, PROMPTS, 0)[0])
    model.set_dtype(mx.bfloat16)
    bf16 = np.concatenate(run_ours(model, PROMPTS, 0)[0])
    bf16_mean = float(np.abs(bf16 - ref).mean())
    print(f"\n[parity] {family}: max |logit diff| = {diff:.2e} (logit range {span:.1f}); "
          f"bf16 vs f32 mean |diff| {bf16_mean:.4f}")
    assert span > 5.0, f"{family}: logits too flat ({span}) for a meaningful comparison"
    assert diff < TOL, f"{family}: max |logit diff| {diff:.3e} >= {TOL}"
    assert bf16_mean < 0.005 * span, f"{family}: bfloat16 drifts {bf16_mean:.4f} from float32"


def test_parity_gemma3_multimodal_text_part(tmp_path):
    """model_type "gemma3" (Gemma3ForConditionalGeneration): text_config nested, weights under
    language_model.*, vision tower present in the checkpoint and dropped; text logits match."""
    t = transformers
    torch.manual_seed(1)
    text = {**BASE, **family_configs()["gemma3_text"][2]}
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=28, patch_size=14)
    cfg = t.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                         boi_token_index=125, eoi_token_index=126, image_token_index=127)
    cfg._attn_implementation = "eager"
    hf = t.Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for _, p in hf.named_parameters():
            p.normal_(0.0, 0.15) if p.ndim >= 2 else p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    model = load_ours(tmp_path)
    assert model.layer_windows == [6, None]
    diff, span = compare(hf, model)
    print(f"\n[parity] gemma3 (multimodal checkpoint, text part): max |logit diff| = {diff:.2e} (range {span:.1f})")
    assert span > 5.0
    assert diff < TOL, f"gemma3: max |logit diff| {diff:.3e} >= {TOL}"


def _old_llama(c):
    c["rope_theta"] = c.pop("rope_parameters")["rope_theta"]


def _old_gemma3(c):
    rp = c.pop("rope_parameters")
    c.pop("layer_types")
    c["rope_theta"] = rp["full_attention"]["rope_theta"]
    c["rope_local_base_freq"] = rp["sliding_attention"]["rope_theta"]
    c["rope_scaling"] = {"rope_type": "linear", "factor": rp["full_attention"]["factor"]}
    c["sliding_window_pattern"] = 2  # layer 0 sliding, layer 1 global, as layer_types said


def _old_phi3(c):
    rp = c.pop("rope_parameters")
    c["rope_theta"], c["partial_rotary_factor"] = rp["rope_theta"], rp["partial_rotary_factor"]
    c["rope_scaling"] = {"type": "longrope", "short_factor": rp["short_factor"], "long_factor": rp["long_factor"]}


def _old_qwen3_moe(c):
    c["num_experts"] = c.pop("num_local_experts")


@pytest.mark.parametrize("family,rewrite", [("llama", _old_llama), ("gemma3_text", _old_gemma3),
                                            ("phi3_longrope", _old_phi3), ("qwen3_moe", _old_qwen3_moe)])
def test_parity_pre_transformers5_config(family, rewrite, tmp_path):
    """Configs as older transformers (and most hub checkpoints) write them: top-level rope_theta /
    rope_scaling / rope_local_base_freq / sliding_window_pattern, num_experts."""
    import json

    hf = make_tiny_checkpoint(family, tmp_path)
    cfg_path = tmp_path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    rewrite(cfg)
    cfg_path.write_text(json.dumps(cfg))
    diff, span = compare(hf, load_ours(tmp_path))
    print(f"\n[parity] {family} (old-style config): max |logit diff| = {diff:.2e}")
    assert diff < TOL, f"{family} old-style config: max |logit diff| {diff:.3e}"


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_moe_fused_expert_layout(family):
    """transformers 5 keeps experts fused in memory (experts.gate_up_proj [E, 2I, D],
    experts.down_proj [E, D, I]); sanitize() splits that layout into switch_mlp too."""
    from jang_serve.engine.models import build_model

    hf = make_tiny_checkpoint(family, None)
    sd = {k: mx.array(v.detach().float().numpy()) for k, v in hf.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in sd)
    model = build_model(hf.config.to_dict())
    model.load_weights(list(model.sanitize(sd).items()), strict=True)
    diff, _ = compare(hf, model)
    assert diff < TOL, f"{family} fused layout: max |logit diff| {diff:.3e}"
