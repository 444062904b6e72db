"""Compile the CUDA kernel sources with the local nvcc (no GPU needed) the way mx.fast.cuda_kernel
wraps them, for a set of template arguments; print registers / spills from ptxas.

    .venv/bin/python bench/kernels_compile_check.py [qmm|fused|tc|qgemm|qgemm3|wg|rs|paged|epilogue|qkv|all]

A stand-in for MLX's device header (Shape) is used; everything else is the real source.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

from jang_serve.kernels import (cuda_common, gemm_epilogue, paged_cuda, paged_v2_cuda, qgemm3_cuda, qgemm_cuda,
                                qgemm_rs_cuda, qgemm_rs_source, qgemm_wg_cuda, qgemm_wg_source, qgemv_tc_cuda,
                                qgemv_tc_source, qkv_epilogue, qmm_cuda)

STUB = """
#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cooperative_groups.h>
#define inf cuda::std::numeric_limits<float>::infinity()
struct Shape { int32_t d[10]; __device__ int32_t operator[](int i) const { return d[i]; } };
"""

CTYPE = {"bfloat16": "__nv_bfloat16", "float16": "__half", "float32": "float", "uint32": "uint32_t",
         "int32": "int32_t"}


def build(name, source, header, inputs, outputs, template):
    """inputs: list of (name, dtype); outputs: list of (name, dtype); template: list of (k, v)."""
    s = STUB + header + "namespace mlx::core::cu {\nnamespace cg = cooperative_groups;\n"
    s += f'extern "C" __global__ void {name}(\n'
    args = []
    for n, dt in inputs:
        args.append(f"const {CTYPE[dt]}* {n}")
        if f"{n}_shape" in source:
            args.append(f"const __grid_constant__ Shape {n}_shape")
    for n, dt in outputs:
        args.append(f"{CTYPE[dt]}* {n}")
    s += ",\n".join(args) + ") {\n"
    for k, v in template:
        if isinstance(v, bool):
            s += f"  constexpr bool {k} = {'true' if v else 'false'};\n"
        elif isinstance(v, int):
            s += f"  constexpr int {k} = {v};\n"
        else:
            s += f"  using {k} = {CTYPE[v]};\n"
    s += source + "\n}\n}\n"
    return s


def compile_one(label, src, arch="sm_90"):
    with tempfile.TemporaryDirectory() as d:
        f = os.path.join(d, "k.cu")
        open(f, "w").write(src)
        mode = "-cubin" if arch.endswith("a") else "-c"     # -c would also assemble a plain compute_90 PTX
        r = subprocess.run(["nvcc", f"-arch={arch}", "-std=c++17", mode, "-o", os.path.join(d, "k.o"),
                            "--ptxas-options=-v", f], capture_output=True, text=True)
    if r.returncode != 0 or "Performance Loss" in r.stderr or re.search(r"[1-9]\d* bytes spill stores", r.stderr):
        print(f"FAIL {label}\n{r.stderr[:4000]}")
        return False
    regs = re.findall(r"Used (\d+) registers", r.stderr)
    spill = re.findall(r"(\d+) bytes spill stores", r.stderr)
    smem = re.findall(r"(\d+) bytes smem", r.stderr)
    print(f"ok   {label}: regs={regs} spill_stores={spill} smem={smem}")
    return True


def check_qmm():
    ok = True
    for bits in (2, 3, 4, 5, 6, 8):
        for m, r, w, fast, pf in ((1, 8, 1, True, False), (1, 8, 2, True, False), (1, 4, 4, False, False),
                                  (4, 2, 2, True, False), (1, 4, 1, True, True), (1, 4, 2, False, True)):
            tmpl = [("T", "bfloat16"), ("S", "bfloat16"), ("BITS", bits), ("GS", 32 if bits == 2 else 64),
                    ("MM", m), ("R", r), ("W", w), ("FAST", fast), ("PF", pf)]
            src = build("qgemv", qmm_cuda.SOURCE, qmm_cuda.header(bits),
                        [("x", "bfloat16"), ("w", "uint32"), ("scales", "bfloat16"), ("biases", "bfloat16")],
                        [("y", "bfloat16")], tmpl)
            ok &= compile_one(f"qgemv bits={bits} M={m} R={r} W={w} fast={fast} pf={pf}", src)
    return ok


def check_fused():
    """The fused GEMV variants of kernels/qmm_fused.py (norm prologue, residual / SwiGLU / RoPE epilogues)."""
    dtypes = dict(x="bfloat16", w="uint32", scales="bfloat16", biases="bfloat16", nw="bfloat16", res="bfloat16",
                  rpos="int32", rfreq="float32", kpool="bfloat16", vpool="bfloat16", kvb="int32", kvo="int32")
    cases = [(epi, norm, bits, m, r, w, None) for epi, norm in ((0, True), (1, False), (2, True), (2, False))
             for bits, m, r, w in ((4, 1, 8, 1), (8, 1, 8, 4), (4, 4, 2, 2), (3, 2, 4, 2))]
    cases += [(3, norm, 8, 1, 8, 4, (128, 40)) for norm in (True, False)]
    cases += [(3, True, bits, 1, 8, w, (128, 40, 32)) for bits, w in ((8, 4), (4, 1))]   # + the KV store
    ok = True
    for epi, norm, bits, m, r, w, rope in cases:
        defines, names = qmm_cuda.fused_variant(epi, norm, 1e-5, rope)
        tmpl = [("T", "bfloat16"), ("S", "bfloat16"), ("BITS", bits), ("GS", 64), ("MM", m), ("R", r),
                ("W", w), ("FAST", True), ("PF", False)]
        src = build("qgemv_fused", qmm_cuda.SOURCE, defines + qmm_cuda.header(bits), [(n, dtypes[n]) for n in names],
                    [("y", "bfloat16")], tmpl)
        ok &= compile_one(f"qgemv fused epi={epi} norm={norm} bits={bits} M={m} R={r} W={w} rope={rope}", src)
    return ok


def check_qgemm():
    ok = True
    for bits in (2, 4, 8):
        for bm, wm, split, dt, sdt, gs in ((16, 1, 2, "bfloat16", "bfloat16", 64), (32, 1, 0, "bfloat16", "bfloat16", 32),
                                          (64, 2, 1, "bfloat16", "bfloat16", 64), (64, 1, 0, "float16", "float16", 128),
                                          (128, 2, 2, "float16", "float32", 64), (32, 2, 0, "bfloat16", "float32", 128)):
            sb = 4 if sdt == "float32" else 2
            bm_ = min(bm, qgemm_cuda.block_rows(bm, bits, sb))
            st = qgemm_cuda.default_stages(bm_, bits, sb)
            tmpl = [("T", dt), ("S", sdt), ("BITS", bits), ("GS", gs), ("BM", bm_), ("WM", min(wm, bm_ // 16)),
                    ("SPLIT", split), ("STAGES", st)]
            src = build("qgemm", qgemm_cuda.SOURCE, qgemm_cuda.HEADER,
                        [("x", dt), ("w", "uint32"), ("scales", sdt), ("biases", sdt)],
                        [("y", "float32" if split else dt)], tmpl)
            ok &= compile_one(f"qgemm bits={bits} BM={bm_} WM={wm} split={split} {dt}/{sdt} gs={gs} stages={st}", src)
    for dt in ("bfloat16", "float16"):
        src = build("qgemm_reduce", qgemm_cuda.REDUCE_SOURCE, qgemm_cuda.HEADER, [("ws", "float32")], [("y", dt)],
                    [("T", dt)])
        ok &= compile_one(f"qgemm_reduce {dt}", src)
    return ok


def check_qgemm3():
    """The weight-stationary GEMM (kernels/qgemm3_cuda.py): every bit width, both dtypes, split or not."""
    ok = True
    for bits in (2, 4, 8):
        for nt, tm, split, dt, sdt, gs in ((8, 2, 0, "bfloat16", "bfloat16", 64), (2, 2, 2, "bfloat16", "bfloat16", 32),
                                           (4, 1, 0, "float16", "float16", 128), (8, 2, 2, "float16", "float32", 64)):
            st = qgemm3_cuda.default_stages(bits, nt, tm)
            tmpl = [("T", dt), ("S", sdt), ("BITS", bits), ("GS", gs), ("NT", nt), ("TM", tm), ("STAGES", st),
                    ("SPLIT", split)]
            src = build("qgemm3", qgemm3_cuda.SOURCE, qgemm3_cuda.HEADER,
                        [("x", dt), ("w", "uint32"), ("scales", sdt), ("biases", sdt)],
                        [("y", "float32" if split else dt)], tmpl)
            ok &= compile_one(f"qgemm3 bits={bits} NT={nt} TM={tm} split={split} {dt}/{sdt} gs={gs} stages={st}", src)
    return ok


def check_tc():
    """The tensor-core GEMV (kernels/qgemv_tc_source.py): plain and fused variants, with and without the ring."""
    dtypes = dict(x="bfloat16", w="uint32", scales="bfloat16", biases="bfloat16", nw="bfloat16", res="bfloat16",
                  rpos="int32", rfreq="float32")
    ok = True
    for epi, norm, bits, rope, pipe, mm, sdt in (
            (0, False, 4, None, 0, 1, "bfloat16"), (0, False, 2, None, 0, 1, "bfloat16"),
            (0, False, 8, None, 0, 1, "bfloat16"), (1, False, 4, None, 0, 1, "bfloat16"),
            (2, True, 4, None, 0, 1, "bfloat16"), (3, True, 8, (128, 40), 0, 1, "bfloat16"),
            (0, False, 4, None, 6, 1, "bfloat16"), (0, False, 2, None, 4, 8, "bfloat16"),
            (0, False, 8, None, 8, 1, "float32"), (2, True, 4, None, 6, 1, "bfloat16"),
            (3, True, 8, (128, 40), 6, 4, "bfloat16"), (1, False, 4, None, 6, 2, "float16")):
        dtypes.update(scales=sdt, biases=sdt)
        defines, names = qmm_cuda.fused_variant(epi, norm, 1e-5, rope)
        u = qgemv_tc_cuda.config(mm, 4096, 4096, bits, 64)["U"]      # as the launch picks it (8 bits: 1)
        if pipe:
            u = qgemv_tc_cuda.pipe_shape(mm, 4096, bits, 64, u, 4 if sdt == "float32" else 2)[0]
        tmpl = [("T", "bfloat16"), ("S", sdt), ("BITS", bits), ("GS", 64), ("MM", mm), ("TT", 1),
                ("NWARP", 4), ("U", u), ("PIPE", pipe)]
        src = build("qgemv_tc", qgemv_tc_source.SOURCE, defines + qgemv_tc_source.HEADER,
                    [(n, dtypes[n]) for n in names], [("y", "bfloat16")], tmpl)
        ok &= compile_one(f"qgemv_tc epi={epi} norm={norm} bits={bits} pipe={pipe} MM={mm} S={sdt}", src)
    return ok


def check_wg():
    """The warpgroup GEMM as NVRTC gets it (no headers, sm_90a), at every default tile of 2/4/8 bits, bf16 and
    fp16, split and not."""
    ok = True
    for bits in (2, 4, 8):
        for bf16 in (True, False):
            for m in (128, 256):
                cfg = qgemm_wg_cuda.config(m, 4096, 4096, bits)
                for split in (False, True):
                    src = qgemm_wg_source.source(bits, 64, bf16, cfg["BN"], cfg["stages"], split, cfg["WGS"], cfg["MT"],
                                                 ws=cfg["ws"])
                    ok &= compile_one(f"wg bits={bits} {'bf16' if bf16 else 'fp16'} m={m} {cfg} split={split}", src,
                                      "sm_90a")
    return ok


def check_rs():
    """The register-operand GEMM as NVRTC gets it, at every row tile its routes use (64-256 in steps of 32),
    2/4/8 bits, groups 32/64/128, bf16 and fp16, split and not (fails on spills and on ptxas serializing the
    wgmmas)."""
    ok = True
    for bits in (2, 4, 8):
        for gs in (32, 64, 128):
            for bf16 in (True, False):
                for m in range(64, 257, 32):
                    cfg = qgemm_rs_cuda.config(m, 4096, 4096, bits)
                    split = gs == 64   # both epilogues over the grid without doubling it
                    src = qgemm_rs_source.source(bits, gs, bf16, cfg["R"], cfg["stages"], split, cfg["CW"])
                    ok &= compile_one(f"rs bits={bits} gs={gs} {'bf16' if bf16 else 'fp16'} {cfg} split={split}",
                                      src, "sm_90a")
    return ok


def check_paged():
    ok = True
    hdr = cuda_common.HEADER + paged_cuda.HEADER
    for bits in (16, 8, 4):
        tmpl = [("T", "bfloat16"), ("BITS", bits), ("KG", 64), ("D", 128), ("G", 4), ("PART", 512),
                ("WINDOW", 0)]
        if bits == 16:
            ins = [("q", "bfloat16"), ("k", "bfloat16"), ("v", "bfloat16"), ("tables", "int32"),
                   ("lens", "int32"), ("scale", "float32")]
            src_body = paged_cuda.SOURCE_F
        else:
            ins = [("q", "bfloat16"), ("kq", "uint32"), ("ks", "bfloat16"), ("kb", "bfloat16"),
                   ("vq", "uint32"), ("vs", "bfloat16"), ("vb", "bfloat16"), ("tables", "int32"),
                   ("lens", "int32"), ("scale", "float32")]
            src_body = paged_cuda.SOURCE_Q
        outs = [("po", "float32"), ("pm", "float32"), ("pl", "float32")]
        ok &= compile_one(f"paged bits={bits}", build("paged", src_body, hdr, ins, outs, tmpl))
    hdr2 = cuda_common.HEADER + paged_v2_cuda.HEADER
    for bits, g, d, part, window in ((16, 4, 128, 32, 0), (16, 4, 128, 512, 0), (16, 8, 128, 128, 0),
                                     (8, 4, 128, 64, 0), (4, 4, 128, 128, 100), (4, 8, 64, 32, 0),
                                     (16, 1, 256, 256, 0), (8, 8, 256, 32, 0)):
        q = [("q", "bfloat16")]
        if bits == 16:
            ins, body = q + [("k", "bfloat16"), ("v", "bfloat16")], paged_v2_cuda.SOURCE_F
        else:
            ins, body = q + [("kq", "uint32"), ("ks", "bfloat16"), ("kb", "bfloat16"), ("vq", "uint32"),
                             ("vs", "bfloat16"), ("vb", "bfloat16")], paged_v2_cuda.SOURCE_Q
        ins += [("tables", "int32"), ("lens", "int32"), ("scale", "float32"), ("cnt", "int32")]
        outs = [("out", "bfloat16"), ("po", "float32"), ("pm", "float32"), ("pl", "float32")]
        tmpl = [("T", "bfloat16"), ("BITS", bits), ("KG", 64 if bits < 16 else 32), ("D", d), ("G", g),
                ("PART", part), ("WINDOW", window)]
        ok &= compile_one(f"paged v2 bits={bits} G={g} D={d} PART={part} window={window}",
                          build("paged_v2", body, hdr2, ins, outs, tmpl))
    src = build("combine", paged_cuda.SOURCE_COMBINE, hdr,
                [("po", "float32"), ("pm", "float32"), ("pl", "float32")], [("out", "bfloat16")],
                [("T", "bfloat16"), ("D", 128)])
    ok &= compile_one("combine", src)
    return ok


def check_epilogue():
    ok = True
    for dt in ("bfloat16", "float16"):
        for vpt in (1, 2, 4):
            src = build("add_norm", gemm_epilogue.SOURCE, "#define JANG_EPS 1e-05f\n",
                        [("ws", "float32"), ("r", dt), ("nw", dt)], [("h", dt), ("hn", dt)],
                        [("T", dt), ("VPT", vpt)])
            ok &= compile_one(f"add_norm {dt} VPT={vpt}", src)
    return ok


def check_qkv():
    """kernels/qkv_epilogue.py: with llama3 frequencies and with a plain base."""
    ok = True
    for dt in ("bfloat16", "float16"):
        for freqs, log2b in ((1, 0.0), (0, 19.931568569324174)):
            hdr = f"#define JANG_FREQS {freqs}\n#define JANG_LOG2BASE {log2b!r}f\n#define JANG_SCALE 1.0f\n"
            src = build("qkv_epi", qkv_epilogue.SOURCE, hdr,
                        [("ws", "float32"), ("pos", "int32"), ("fr", "float32"), ("blk", "int32"), ("off", "int32"),
                         ("kpool", dt), ("vpool", dt)], [("q", dt), ("kv", dt)], [("T", dt), ("HD", 128), ("NQ", 32), ("NKV", 8)])
            ok &= compile_one(f"qkv_epi {dt} freqs={freqs}", src)
    return ok


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "all"
    ok = True
    if what in ("qmm", "all"):
        ok &= check_qmm()
    if what in ("fused", "all"):
        ok &= check_fused()
    if what in ("tc", "all"):
        ok &= check_tc()
    if what in ("qgemm", "all"):
        ok &= check_qgemm()
    if what in ("qgemm3", "all"):
        ok &= check_qgemm3()
    if what in ("wg", "all"):
        ok &= check_wg()
    if what in ("rs", "all"):
        ok &= check_rs()
    if what in ("paged", "all"):
        ok &= check_paged()
    if what in ("qkv", "all"):
        ok &= check_qkv()
    if what in ("epilogue", "all"):
        ok &= check_epilogue()
    sys.exit(0 if ok else 1)
