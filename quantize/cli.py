"""`jangq`: convert | inspect | eval."""

from __future__ import annotations

import argparse
import json
import sys

def _convert(a) -> int:
    from pathlib import Path

    from tqdm import tqdm

    from .profiles import resolve

    if Path(a.output).exists():
        raise FileExistsError(f"output {a.output} already exists; choose a new path or remove it")
    resolve(a.profile, a.bits)  # bad profile / budget: fail before the progress bar

    from .convert import convert

    bar = tqdm(total=1000, unit="‰", disable=a.quiet, bar_format="{l_bar}{bar}| {elapsed}<{remaining} {postfix}")

    def progress(d):
        bar.n = int(1000 * d["fraction"])
        bar.set_postfix_str(d.get("message", "")[:50])
        bar.refresh()

    opts = {k: v for k, v in (("act_order", a.act_order or None), ("damp", a.damp),
                              ("minmax_mlp_in_bits", a.minmax_mlp_in_bits)) if v is not None}
    r = convert(a.src, a.output, profile=a.profile, bits=a.bits, method=a.method, group_size=a.group_size,
                calib=a.calib, progress=progress, calib_tokens=a.calib_tokens, gptq_options=opts or None)
    bar.close()
    print(json.dumps({"path": str(r.path), "profile": r.profile, "method": r.method, "average_bits": r.average_bits,
                      "nominal_bits": r.nominal_bits, "size_bytes": r.size_bytes, "seconds": round(r.seconds, 1)}))
    return 0


def _inspect(a) -> int:
    from .inspect import format_table, inspect_bundle

    info = inspect_bundle(a.path)
    print(json.dumps(info, indent=1) if a.json else format_table(info))
    return 0


def _eval(a) -> int:
    from .evaluate import run_cli

    return run_cli(a)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="jangq", description="JANG quantizer: convert, inspect and evaluate models")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert", help="quantize a model (HF folder, mlx folder or .gguf) into a JANG v2 bundle")
    c.add_argument("src")
    c.add_argument("-o", "--output", required=True)
    g = c.add_mutually_exclusive_group()
    g.add_argument("--profile", "-p", help="JANG_2S ... JANG_6M, or a budget profile JANG_2K ... JANG_6K")
    g.add_argument("--bits", "-b", type=float, help="average bits budget (2-8), sensitivity-allocated")
    c.add_argument("--method", "-m", choices=["rtn", "mse", "gptq"], help="default: rtn (or the profile's option)")
    c.add_argument("--group-size", "-g", type=int, choices=[32, 64, 128], help="default: 64 (or the profile's)")
    c.add_argument("--calib", help="calibration text file, or docs-mix (default: built-in text + the docs tail)")
    c.add_argument("--calib-tokens", type=int, help="calibration tokens for gptq / --bits (default: 4096)")
    c.add_argument("--act-order", action="store_true", help="gptq: quantize columns in decreasing Hessian order")
    c.add_argument("--damp", type=float, help="gptq: damping as a fraction of the mean Hessian diagonal (0.01)")
    c.add_argument("--minmax-mlp-in-bits", type=int, metavar="B",
                   help="gptq: plain min/max rounding for gate/up at <= B bits (2 wins on Qwen2.5, loses on SmolLM2)")
    c.add_argument("--quiet", "-q", action="store_true")
    c.set_defaults(fn=_convert)
    i = sub.add_parser("inspect", help="table of tensors, bits and bytes of a bundle")
    i.add_argument("path")
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=_inspect)
    e = sub.add_parser("eval", help="perplexity, KL vs a reference, top-1 agreement, multiple choice")
    e.add_argument("paths", nargs="+", help="one or more model folders / GGUF files")
    e.add_argument("--ref", help="reference model (KL and top-1 agreement are measured against it)")
    e.add_argument("--text", help="text file (default: the Python docs sources)")
    e.add_argument("--tokens", type=int, default=16384, help="tokens of text for perplexity")
    e.add_argument("--kl-tokens", type=int, default=8192, help="tokens for KL / top-1")
    e.add_argument("--window", type=int, default=512)
    e.add_argument("--mc", help="JSONL of {question, choices, answer} for multiple-choice accuracy")
    e.add_argument("--plot", help="write a PNG of perplexity against average bits here")
    e.add_argument("--output", "-o", help="write the JSON here too")
    e.set_defaults(fn=_eval)
    a = p.parse_args(argv)
    try:
        return a.fn(a)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"jangq {a.cmd}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
