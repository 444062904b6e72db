"""convert(): float (or GGUF / mlx) model -> JANG v2 bundle, streamed layer by layer.

    plan      profiles.resolve(profile, bits): a fixed (critical, important, compress) triplet, or a
              bit budget whose per-tensor widths come from the sensitivity allocator (allocate.py)
    stream    for each layer group of the source: role of every weight -> bits -> quantize
              (rtn / mse / gptq) -> the shard writer; norms, biases, routers pass through in float16
    finish    index, config.json (mlx-style quantization), jang_config.json, tokenizer files, then an
              atomic rename of the temp folder (created next to the destination) onto `out`

Bit accounting is honest: `average_bits` is the stored bits per weight over every 2-D (and stacked
expert) weight matrix, counting the packed codes, the float16 scales and biases, and float-kept
matrices at 16 bits. `nominal_bits` is the same average without the scale/bias overhead (the
figure "4-bit" refers to); budgets (K profiles, --bits) are nominal.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import mlx.core as mx

from . import affine
from .profiles import Plan, resolve
from .roles import Role, module_path, role
from .sources import SourceError, open_source
from .writer import BundleWriter, quantization_block

METHODS = ("rtn", "mse", "gptq")
GROUP_SIZES = (32, 64, 128)


@dataclass
class ConvertResult:
    path: Path
    average_bits: float
    size_bytes: int
    profile: str
    method: str
    nominal_bits: float = 0.0
    target_bits: float | None = None
    seconds: float = 0.0
    tensors: int = 0
    widths: dict = field(default_factory=dict, repr=False)


class BitCounter:
    """Stored and nominal bits over all weight matrices."""

    def __init__(self):
        self.params = 0
        self.stored_bits = 0
        self.nominal = 0

    def add(self, n: int, stored_bytes: int, bits: int) -> None:
        self.params += n
        self.stored_bits += 8 * stored_bytes
        self.nominal += n * bits

    @property
    def average(self) -> float:
        return self.stored_bits / max(self.params, 1)

    @property
    def nominal_average(self) -> float:
        return self.nominal / max(self.params, 1)


def _float_store(a: mx.array) -> mx.array:
    """Float tensors are stored in float16 (as the reference does) unless they would overflow."""
    if a.dtype in (mx.uint32, mx.int32, mx.int64, mx.uint8):
        return a
    if float(mx.max(mx.abs(a.astype(mx.float32)))) < 60000:
        return a.astype(mx.float16)
    return a.astype(mx.bfloat16)


def _check_args(out: Path, method: str, group_size: int) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {group_size}")
    if out.exists():
        raise FileExistsError(f"output {out} already exists; choose a new path or remove it")


def convert(src, out, profile=None, bits=None, method=None, group_size=None, calib=None,
            progress: Callable[[dict], None] | None = None, widths: dict[str, int] | None = None,
            calib_tokens: int | None = None, gptq_options: dict | None = None) -> ConvertResult:
    """Quantize `src` (HF folder, mlx/JANG folder or .gguf file) into a new JANG v2 bundle at `out`.

    profile: one of profiles.PROFILES, or bits: an average-bits budget in [2, 8] (sensitivity
    allocation); method: rtn | mse | gptq; calib: a text file (or string) for gptq / allocation
    (default: the built-in calibration text), or a list of token ids (already tokenized);
    calib_tokens: how many calibration tokens to use (default calib.DEFAULT_TOKENS);
    gptq_options: GPTQRunner keywords (damp, act_order); progress(dict(fraction, tensor, eta_s, message)).
    `widths` (module path -> bits or (bits, group size)) overrides the plan entirely (used by the allocator and tests).
    method / group_size default to the profile's options ("JANG_4M:mse:g32"), else rtn / 64.
    """
    t0 = time.time()
    plan = resolve(profile, bits)
    method = method or plan.method or "rtn"
    group_size = group_size or plan.group_size or 64
    out = Path(out)
    _check_args(out, method, int(group_size))
    source = open_source(src)
    report = progress or (lambda d: None)
    calib_ids = None
    allocated = widths is None and plan.budget is not None
    if allocated:
        from .allocate import allocate

        calib_ids = _calib_ids(source, calib, calib_tokens)
        report({"fraction": 0.0, "tensor": "", "eta_s": None, "message": "measuring tensor sensitivity"})
        widths = allocate(source, plan.budget, group_size, calib_ids, method=method)
        source = open_source(src)  # fresh lazy skeleton for streaming
    hessians = None
    if method == "gptq":
        from .gptq import GPTQRunner

        if calib_ids is None:
            calib_ids = _calib_ids(source, calib, calib_tokens)
        hessians = GPTQRunner(source, calib_ids, **(gptq_options or {}))

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        result = _stream(source, plan, method, int(group_size), widths, hessians, tmp, report, t0,
                         calib=calib, widths_from_allocator=allocated)
        if out.exists():
            raise FileExistsError(f"output {out} appeared while converting; not overwriting it")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result.path = out
    result.seconds = time.time() - t0
    report({"fraction": 1.0, "tensor": "", "eta_s": 0.0, "message": f"wrote {out}"})
    return result


def _calib_ids(source, calib, n_tokens: int | None = None) -> list[int]:
    from .calib import DEFAULT_TOKENS, calibration_tokens

    n = int(n_tokens or DEFAULT_TOKENS)
    if calib is not None and not isinstance(calib, (str, os.PathLike)):
        ids = [int(t) for t in calib][:n]  # already tokenized
        if len(ids) < 64:
            raise ValueError(f"calibration ids are too few ({len(ids)}; need at least 64)")
        return ids
    return calibration_tokens(source, calib, n)


def _stream(source, plan: Plan, method, group_size, widths, hessians, tmp: Path, report, t0,
            calib=None, widths_from_allocator: bool = False) -> ConvertResult:
    writer = BundleWriter(tmp)
    counter = BitCounter()
    per_module: dict[str, tuple[int, int]] = {}
    manifest: dict[str, dict] = {}
    moe = source.moe
    n_layers = int(source.config.get("num_hidden_layers") or 0)
    done = 0
    total_groups = n_layers + 1
    for key, tensors in source.groups():
        if hessians is not None:
            hessians.see_group(key, tensors)
            if key >= 0:
                hessians.prepare_layer(key, tensors)
        for name in sorted(tensors):
            w = tensors[name]
            shape = tuple(w.shape)
            r = role(name, shape, moe)
            is_matrix = name.endswith(".weight") and len(shape) >= 2
            path = module_path(name)
            b = None
            gs = affine.pick_group_size(shape[-1], group_size) if r is not None else None
            if r is not None and gs is not None:
                b = widths.get(path) if widths is not None else plan.bits_for(r)
                if isinstance(b, tuple):  # the allocator picks the group size too
                    b, gs = b
            if b is None or b >= 16:
                stored = _float_store(w)
                writer.add(name, stored)
                if is_matrix:
                    counter.add(w.size, stored.nbytes, 16)
                continue
            if hessians is not None and key >= 0 and w.ndim == 2:
                wq, s, bi = hessians.quantize(name, w, b, gs)
            else:
                wq, s, bi = affine.quantize(w, b, gs, "mse" if method == "gptq" else method)
            mx.eval(wq, s, bi)
            writer.add(path + ".weight", wq)
            writer.add(path + ".scales", s)
            writer.add(path + ".biases", bi)
            counter.add(w.size, wq.nbytes + s.nbytes + bi.nbytes, b)
            per_module[path] = (b, gs)
            manifest[path] = {"bits": b, "group_size": gs, "role": r.value, "shape": list(shape),
                              "weight_key": f"{path}.weight", "scales_key": f"{path}.scales",
                              "biases_key": f"{path}.biases"}
        if hessians is not None and key >= 0:
            hessians.finish_layer(key)
        done += 1
        frac = min(done / total_groups, 0.99)
        el = time.time() - t0
        report({"fraction": frac, "tensor": f"layer {key}" if key >= 0 else "embeddings/head",
                "eta_s": el / frac * (1 - frac) if frac > 0 else None,
                "message": f"quantized {'layer ' + str(key) if key >= 0 else 'non-layer tensors'}"})
    if not per_module:
        raise SourceError(f"{source.path}: no weight matrix could be quantized")

    used = sorted({b for b, _ in per_module.values()})
    calib_info = hessians.describe() if hessians is not None else None
    if calib_info is not None or widths_from_allocator:
        calib_info = dict(calib_info or {"method": "fisher-allocation"})
        calib_info["text"] = ("token ids given" if calib is not None and not isinstance(calib, (str, os.PathLike))
                              else str(calib) if calib is not None else "builtin")
        if widths_from_allocator:
            calib_info["allocator"] = (f"diagonal Fisher x {'RTN' if method == 'rtn' else 'MSE-clip'} error per "
                                       "(width, group size), greedy under the stored-bits budget")
    config = dict(source.config)
    config["quantization"] = quantization_block(min(used), group_size, per_module)
    tok_files = source.save_tokenizer(tmp)
    target = plan.budget
    jang = {
        "quantization": {
            "method": method,
            "quantization_method": method,
            "profile": plan.label,
            "profile_options": {"method": plan.method, "group_size": plan.group_size},
            "target_bits": target,
            "actual_bits": round(counter.average, 4),
            "nominal_bits": round(counter.nominal_average, 4),
            "bits_definition": "actual_bits: stored bits per weight over all weight matrices incl. "
                               "float16 scales/biases; nominal_bits and target_bits exclude them",
            "block_size": group_size,
            "group_size": group_size,
            "bit_widths_used": used,
            "quantization_scheme": "asymmetric",
            "quantization_backend": "mx.quantize-affine",
            "calibration": calib_info,
            "tensor_quantization_manifest_schema": 1,
            "tensor_quantization_manifest_count": len(manifest),
            "tensor_quantization_manifest": manifest,
        },
        "source_model": {"name": Path(source.path).name, "format": source.kind,
                         "model_type": source.config.get("model_type")},
        "architecture": {"type": "moe" if moe else "transformer", "has_moe": moe, "has_ssm": False,
                         "has_vision": False},
        "tokenizer_files": tok_files,
        "producer": "jang-serve",
    }
    info = writer.finish(config, jang)
    return ConvertResult(path=tmp, average_bits=round(counter.average, 4), size_bytes=info["size_bytes"],
                         profile=plan.label, method=method, nominal_bits=round(counter.nominal_average, 4),
                         target_bits=target, tensors=len(manifest),
                         widths={p: b for p, (b, _) in per_module.items()})
