"""RTN / MSE / GPTQ math on arrays, and method="gptq" through convert() (recorded truthfully)."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from jang_serve.quantize import affine, convert
from jang_serve.quantize.bundle import forward_logits, load_bundle
from jang_serve.quantize.gptq import gptq_quantize
from test_quant_convert import make_tiny


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_pack_is_mlx_layout(bits):
    w = mx.random.normal((8, 256), key=mx.random.key(bits))
    wq, s, b = mx.quantize(w, group_size=64, bits=bits)
    deq = np.array(mx.dequantize(wq, s, b, group_size=64, bits=bits))
    codes = np.rint((deq - np.repeat(np.array(b), 64, 1)) / np.repeat(np.array(s), 64, 1))
    assert np.array_equal(np.array(affine.pack(codes, bits)), np.array(wq))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_mse_clipping_beats_min_max(bits):
    w = mx.random.normal((64, 256), key=mx.random.key(7)) * mx.linspace(0.5, 2, 256)
    e_rtn = float(mx.mean((affine.dequantize(*affine.rtn(w, bits, 64), bits, 64) - w) ** 2))
    e_mse = float(mx.mean((affine.dequantize(*affine.mse(w, bits, 64), bits, 64) - w) ** 2))
    assert e_mse < 0.95 * e_rtn
    # importance weighting moves error away from the heavy columns
    imp = mx.concatenate([mx.full((64,), 100.0), mx.ones((192,))])
    wq = affine.mse(w, bits, 64, importance=imp)
    d = affine.dequantize(*wq, bits, 64) - w
    assert float(mx.mean(d[:, :64] ** 2)) < e_mse


def _problem(seed=0, out=48, inp=128):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(1024, inp)).astype(np.float32) @ rng.normal(size=(inp, inp)).astype(np.float32) * 0.1
    x[:, :4] *= 8
    return rng.normal(size=(out, inp)).astype(np.float32), x


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_lowers_output_error(act_order):
    w, x = _problem()
    h = x.T @ x

    def out_err(wh):
        return float(((x @ (w - wh).T) ** 2).mean())

    for bits in (2, 4):
        e_mse = out_err(np.array(affine.dequantize(*affine.mse(mx.array(w), bits, 64), bits, 64)))
        codes, s, b = gptq_quantize(w, h, bits, 64, act_order=act_order)
        assert codes.max() <= 2**bits - 1 and s.shape == (48, 2)
        # exactly representable in MLX's format: pack, dequantize, same numbers
        wh = np.array(affine.dequantize(affine.pack(codes, bits), mx.array(s).astype(mx.float16),
                                        mx.array(b).astype(mx.float16), bits, 64))
        manual = codes * np.repeat(s, 64, 1) + np.repeat(b, 64, 1)
        assert np.allclose(wh, manual, atol=1e-5)
        assert out_err(wh) < 0.6 * e_mse, (bits, out_err(wh), e_mse)


def test_gptq_convert_is_recorded_and_helps(tmp_path):
    src = make_tiny(tmp_path / "src", seed=5)
    from jang_serve.quantize.calib import calibration_tokens
    from jang_serve.quantize.sources import open_source
    from realdata import python_docs_text

    docs = python_docs_text()
    text = tmp_path / "calib.txt"
    text.write_text(docs[300_000:303_000])
    ids = calibration_tokens(open_source(src), None, n_tokens=200)[:128]  # eval text: other docs
    fm, _ = load_bundle(src)
    ref = forward_logits(fm, ids)
    errs = {}
    for m in ("rtn", "gptq"):
        r = convert(src, tmp_path / m, profile="JANG_2S", method=m, calib=text if m == "gptq" else None)
        jq = json.loads((r.path / "jang_config.json").read_text())["quantization"]
        assert jq["method"] == m and r.method == m
        if m == "gptq":
            assert jq["calibration"]["method"] == "gptq" and jq["calibration"]["tokens"] >= 512
            assert jq["calibration"]["text"] == str(text)
        qm, _ = load_bundle(r.path)
        errs[m] = float(mx.mean((forward_logits(qm, ids) - ref) ** 2))
    assert errs["gptq"] < errs["rtn"]


def test_short_calibration_file_is_an_error(tmp_path):
    src = make_tiny(tmp_path / "src")
    short = tmp_path / "c.txt"
    short.write_text("hi")
    with pytest.raises(ValueError, match="too short"):
        convert(src, tmp_path / "o", profile="JANG_2S", method="gptq", calib=short)
    with pytest.raises(FileNotFoundError, match="calibration file"):
        convert(src, tmp_path / "o", profile="JANG_2S", method="gptq", calib=tmp_path / "nope.txt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.txt", "src"]


@pytest.mark.parametrize("bits", [4, 8])
def test_mse_recovers_gguf_q4_1_blocks_exactly(bits):
    # GGUF Q4_1: per 32 weights, w = m + d * q with q in 0..15, d and m in float16, and (as llama.cpp
    # rounds from the group's min and max) codes 0 and 15 both used. MLX affine at 4 bits, group 32,
    # holds these exactly, and the 8-bit grid contains the 4-bit one; the MSE search finds them.
    rng = np.random.default_rng(0)
    rows, groups = 16, 8
    d = rng.uniform(0.01, 0.1, (rows, groups, 1)).astype(np.float16).astype(np.float32)
    m = rng.uniform(-0.5, 0.0, (rows, groups, 1)).astype(np.float16).astype(np.float32)
    q = rng.integers(0, 16, (rows, groups, 32))
    q[..., 0], q[..., 1] = 0, 15
    w = mx.array((m + d * q).reshape(rows, groups * 32))
    got = affine.dequantize(*affine.mse(w, bits, 32), bits, 32)
    # 4 bits: exact; 8 bits: d/17 is not a float16 number, so within a tiny fraction of a step
    assert float(mx.abs(got - w).max()) < (1e-6 if bits == 4 else 0.1 * float(d.min()))
    rtn = affine.dequantize(*affine.rtn(w, bits, 32), bits, 32)
    assert float(mx.abs(got - w).max()) <= float(mx.abs(rtn - w).max())


def test_gptq_damps_more_when_calibration_is_thin():
    """Fewer calibration tokens than twice a linear's input dim: 10% damping instead of 1%."""
    from types import SimpleNamespace

    from jang_serve.quantize.gptq import GPTQRunner

    r = SimpleNamespace(damp=0.01, tokens=4096)
    assert GPTQRunner.damping(r, 896) == 0.01  # Qwen2.5-0.5B q/k/v/o/gate/up inputs
    assert GPTQRunner.damping(r, 4864) == 0.1  # its down_proj input
    assert GPTQRunner.damping(SimpleNamespace(damp=0.2, tokens=512), 4864) == 0.2  # never lowers it


def test_gptq_cholesky_on_torch_matches_mlx():
    """The torch path (used on CUDA machines) gives the same factor U (U^T U = H^-1) as the MLX one; run here
    with torch on the CPU."""
    torch = pytest.importorskip("torch")
    from jang_serve.quantize import gptq

    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 96)).astype(np.float64)
    H = x.T @ x + 0.01 * np.eye(96)
    a = gptq._upper_chol_torch(H, torch, "cpu")
    b = gptq._upper_chol_of_inverse(H)
    assert np.allclose(a.T @ a, np.linalg.inv(H), rtol=1e-3, atol=1e-6)
    assert np.allclose(a, b, rtol=1e-3, atol=1e-4)
    assert np.allclose(np.triu(a), a)


def test_convert_takes_token_ids_and_gptq_options(tmp_path):
    """Pre-tokenized calibration (a list of ids), calib_tokens and act-order reach GPTQ and are recorded."""
    src = make_tiny(tmp_path / "src")
    ids = list(range(3, 3 + 300))
    convert(src, tmp_path / "out", profile="JANG_4M", method="gptq", calib=ids, calib_tokens=256,
            gptq_options={"act_order": True})
    cal = json.loads((tmp_path / "out" / "jang_config.json").read_text())["quantization"]["calibration"]
    assert cal["tokens"] == 256 and cal["act_order"] is True and cal["text"] == "token ids given"
    with pytest.raises(ValueError, match="too few"):
        convert(src, tmp_path / "out2", profile="JANG_4M", method="gptq", calib=[1, 2, 3])
    assert not (tmp_path / "out2").exists()


def test_docs_mix_calibration_text_skips_the_eval_text():
    """The "docs-mix" text never contains the docs the evaluation reads and mixes many files; nor does the tail."""
    from jang_serve.quantize.calib import BUILTIN, FILE_CHARS, default_text
    from jang_serve.quantize.evaluate import load_text

    ev = load_text()
    cal = default_text(200_000, mix=True)
    assert cal.startswith(BUILTIN.read_text(encoding="utf-8"))
    hits = [i for i in range(0, len(ev) - 300, 5_000) if ev[i : i + 300] in cal]
    assert hits == []
    assert len(cal) - len(BUILTIN.read_text(encoding="utf-8")) > 20 * FILE_CHARS // 2  # many files, not one
    assert cal.startswith(default_text(60_000, mix=True))  # 4,096 tokens are a prefix of longer budgets
    tail = default_text(60_000)
    assert [i for i in range(0, len(ev) - 300, 5_000) if ev[i : i + 300] in tail] == []


def test_gptq_minmax_for_mlp_inputs_option(tmp_path):
    """minmax_mlp_in_bits=4: gate/up at <= 4 bits are exactly mx.quantize (min/max), down_proj stays GPTQ."""
    src = make_tiny(tmp_path / "src")
    convert(src, tmp_path / "a", profile="JANG_4M", method="gptq", calib=list(range(3, 300)),
            gptq_options={"minmax_mlp_in_bits": 4})
    w = mx.load(str(next((tmp_path / "a").glob("*.safetensors"))))
    ref = mx.load(str(next(src.glob("*.safetensors"))))
    for name in ("model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"):
        f = ref[name + ".weight"].astype(mx.float32)
        wq, _, _ = mx.quantize(f, group_size=64, bits=4)
        same = bool(mx.array_equal(w[name + ".weight"], wq))
        assert same == ("up_proj" in name), name
    cal = json.loads((tmp_path / "a" / "jang_config.json").read_text())["quantization"]["calibration"]
    assert cal["minmax_mlp_in_bits"] == 4


def test_cli_passes_gptq_options(tmp_path, capsys):
    """jangq convert --calib-tokens / --act-order / --damp / --minmax-mlp-in-bits reach GPTQ and are recorded."""
    from jang_serve.quantize.cli import main

    src = make_tiny(tmp_path / "src")
    calib = tmp_path / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    assert main(["convert", str(src), "-o", str(tmp_path / "q"), "--profile", "JANG_4M", "--method", "gptq",
                 "--calib", str(calib), "--calib-tokens", "256", "--act-order", "--damp", "0.05",
                 "--minmax-mlp-in-bits", "2", "--quiet"]) == 0
    cal = json.loads((tmp_path / "q" / "jang_config.json").read_text())["quantization"]["calibration"]
    assert (cal["tokens"], cal["act_order"], cal["damp"], cal["minmax_mlp_in_bits"]) == (256, True, 0.05, 2)
