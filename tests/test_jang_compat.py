"""JANG v2 compatibility: bundles written by the reference `jang` 2.5.50 converter load here and give
the same logits as the reference package's own loader (jang_tools.loader.load_jang_model, which
builds an mlx-lm model). Also bundles whose per-module bits must come from the tensor manifest or
from the shapes alone (config overrides stripped, a misleading global default left in place)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from jang_serve.engine.loader import detect_format, infer_from_shapes, load_model
from jang_serve.engine.models.layers import QLinear

from test_loader import PROMPTS, make_hf, our_logits

pytest.importorskip("jang_tools")  # the reference package is part of the test environment


def _convert(src: Path, out: Path, profile: str, block_size: int = 64) -> None:
    import jang_tools

    assert jang_tools.__version__ == "2.5.50"
    jang_tools.convert_model(str(src), str(out), profile=profile, block_size=block_size)


def _reference_logits(bundle: Path) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Logits of the reference loader's model (an mlx-lm model): in its stored float16, and cast
    to float32."""
    from jang_tools.loader import load_jang_model

    model, _ = load_jang_model(str(bundle))
    native = [np.array(model(mx.array([p]))[0].astype(mx.float32)) for p in PROMPTS]
    model.set_dtype(mx.float32)
    return native, [np.array(model(mx.array([p]))[0]) for p in PROMPTS]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """{name: (bundle path, reference logits in float32, in float16)} for a llama (JANG_4M, group 64) and a
    tied-embedding qwen3 (JANG_3L, group 128)."""
    root = tmp_path_factory.mktemp("jang")
    out = {}
    for name, family, profile, bs, tie in [("llama", "llama", "JANG_4M", 64, False),
                                           ("qwen3", "qwen3", "JANG_3L", 128, True)]:
        src = root / f"{name}-hf"
        src.mkdir()
        make_hf(src, family, "fp32", tie=tie, hidden=256, seed=1)
        dst = root / f"{name}-jang"
        _convert(src, dst, profile, bs)
        native, f32 = _reference_logits(dst)
        out[name] = (dst, f32, native)
    return out


def _bits_by_module(bundle: Path) -> dict[str, tuple[int, int]]:
    man = json.loads((bundle / "jang_config.json").read_text())["quantization"]["tensor_quantization_manifest"]
    return {k: (v["bits"], v["group_size"]) for k, v in man.items()}


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_reference_bundle_matches_reference_loader(bundles, name):
    bundle, ref, _ = bundles[name]
    assert detect_format(bundle) == "jang"
    lm = load_model(bundle)
    assert lm.format == "jang" and lm.dtype == mx.float32
    mods = {k: (v["bits"], v["group_size"]) for k, v in lm.quantization["modules"].items()}
    assert mods == _bits_by_module(bundle)
    assert len({b for b, _ in mods.values()}) >= 2  # really mixed precision
    q = lm.model.model.layers[0].self_attn.q_proj
    assert isinstance(q, QLinear) and (q.bits, q.group_size) == mods["model.layers.0.self_attn.q_proj"]
    for ours, theirs in zip(our_logits(lm.model), ref):
        assert np.abs(theirs).max() > 1.0
        np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)


def test_half_precision_matches_reference_native_dtype(bundles):
    """The reference runs the bundle in its stored float16; loading ours in float16 agrees."""
    bundle, ref32, ref16 = bundles["llama"]
    ours16 = our_logits(load_model(bundle, dtype="float16").model)
    for a, b, c in zip(ours16, ref16, ref32):
        scale = np.abs(c).max()
        assert np.abs(a - b).max() < 0.02 * scale
        assert np.abs(a - c).max() < 0.02 * scale


def _strip(bundle: Path, dst: Path, keep_manifest: bool, global_bits=(4, 64)) -> Path:
    """Copy a bundle without config.json's per-module overrides (global_bits left as the only
    entry, or no "quantization" key at all when None), optionally without the manifest too."""
    shutil.copytree(bundle, dst)
    cfg = json.loads((dst / "config.json").read_text())
    if global_bits is None:
        cfg.pop("quantization")
    else:
        cfg["quantization"] = {"group_size": global_bits[1], "bits": global_bits[0], "mode": "affine"}
    (dst / "config.json").write_text(json.dumps(cfg))
    if not keep_manifest:
        jc = json.loads((dst / "jang_config.json").read_text())
        jc["quantization"].pop("tensor_quantization_manifest")
        (dst / "jang_config.json").write_text(json.dumps(jc))
    return dst


@pytest.mark.parametrize("name", ["llama", "qwen3"])
@pytest.mark.parametrize("keep_manifest, global_bits", [(True, (4, 64)), (False, (4, 64)), (False, None)],
                         ids=["from-manifest", "from-shapes", "from-shapes-no-config-quantization"])
def test_bits_without_config_overrides(bundles, name, keep_manifest, global_bits, tmp_path):
    bundle, ref, _ = bundles[name]
    stripped = _strip(bundle, tmp_path / "b", keep_manifest, global_bits)
    assert detect_format(stripped) == "jang"
    lm = load_model(stripped)
    want = _bits_by_module(bundle)
    got = lm.quantization["modules"]
    assert {k: (v["bits"], v["group_size"]) for k, v in got.items()} == want
    sources = {v["source"] for v in got.values()}
    if keep_manifest:
        assert "manifest" in sources and "shape" not in sources
    else:
        # a global 4-bit/gs64 left in config.json fits some modules; the rest come from shapes
        assert "shape" in sources and "manifest" not in sources
    for ours, theirs in zip(our_logits(lm.model), ref):
        np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)


def test_shape_inference_breaks_ties_with_input_dim():
    # bits*group_size is the same for these, so weight/scales width ratios alone cannot tell them apart
    for in_dim in (128, 256, 512):
        for bits, gs in [(4, 64), (8, 32), (2, 128), (8, 128), (4, 128), (3, 64), (6, 32)]:
            if in_dim % gs:
                continue
            assert infer_from_shapes(in_dim, in_dim * bits // 32, in_dim // gs) == (bits, gs)
    # 4-bit/gs64 at in=128 and 8-bit/gs128 at in=256 have the same scales shape [out, 2]
    assert infer_from_shapes(128, 16, 2) == (4, 64)
    assert infer_from_shapes(256, 64, 2) == (8, 128)
    assert infer_from_shapes(128, 7, 2) is None


@pytest.mark.parametrize("change, problem", [
    (lambda jc: jc.update(format_version="1.1"), "JANG format_version 1.1 is not supported"),
    (lambda jc: jc["quantization"].update(hadamard_rotation=True), "Hadamard-rotated bundles are not supported"),
    (None, "bad JSON"),
], ids=["v1", "hadamard", "bad-json"])
def test_unsupported_bundles_say_why(bundles, tmp_path, change, problem):
    from jang_serve.engine.loader import LoadError

    d = tmp_path / "b"
    shutil.copytree(bundles["llama"][0], d)
    f = d / "jang_config.json"
    if change is None:
        f.write_text("{oops")
    else:
        jc = json.loads(f.read_text())
        change(jc)
        f.write_text(json.dumps(jc))
    with pytest.raises(LoadError) as e:
        load_model(d)
    assert str(f) in str(e.value) and problem in str(e.value), str(e.value)
