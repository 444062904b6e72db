"""The quality benchmark at the full method on a GPU (MLX CUDA): conversions in parallel, evaluation on the GPU.

    python bench/quality_gpu.py stage             here: token ids (.npy), GGUF pieces, wheels -> .qstage/
    python bench/quality_gpu.py run --out DIR     device: convert every variant (worker processes), evaluate
    python bench/quality_gpu.py run --smoke       here: the same path on SmolLM2 with 2 windows (a typo check)
    python bench/quality_gpu.py report ROWS.json  here: rows -> bench/results/quality-<model>.json and .png

Method = bench/quality.py (QUALITY_ANCHORS.md): perplexity over the first 16,384 tokens of the Python docs in
512-token windows (token 0 of a window is context only), KL(reference || model) and top-1 agreement over the
first 8,192, reference = the GGUF dequantized and rounded to bf16, every forward in float32 on dequantized
weights; the eval text is tokenized here with transformers' GGUF tokenizer (as the anchors were). The
calibration text (quantize/calib.py default: built-in text + the *end* of the docs) is tokenized here with our
tokenizer: GPTQ takes its first N tokens, and the next 8,192 tokens are a held-out calibration slice whose
perplexity chooses between variants without looking at the eval text.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STAGE = REPO / ".qstage"
WINDOW, TOKENS, KL_TOKENS, HELD_OUT = 512, 16384, 8192, 8192
CALIB_POOL = 32768 + HELD_OUT  # GPTQ uses at most the first 32,768; the rest is held out

# name -> (model, convert() keywords). "calib": number of calibration tokens (default 4096, the CPU default).
VARIANTS = {
    "qwen2.5-coder": {
        "ours JANG_2S (gptq, 4k calib, previous text)": {"profile": "JANG_2S", "method": "gptq", "calib": 4096,
                                                         "pool": "calib4k-old"},
        "ours JANG_2S (gptq, 4k calib)": {"profile": "JANG_2S", "method": "gptq", "calib": 4096},
        "ours JANG_2S (gptq, 16k calib)": {"profile": "JANG_2S", "method": "gptq", "calib": 16384},
        "ours JANG_2S (gptq, 32k calib)": {"profile": "JANG_2S", "method": "gptq", "calib": 32768},
        "ours JANG_2S (gptq, 32k calib, act-order)": {"profile": "JANG_2S", "method": "gptq", "calib": 32768,
                                                      "gptq_options": {"act_order": True}},
        "ours JANG_2S (gptq, 32k calib, act-order, 10% damping)": {
            "profile": "JANG_2S", "method": "gptq", "calib": 32768, "gptq_options": {"act_order": True, "damp": 0.1}},
        "ours JANG_2S (mse)": {"profile": "JANG_2S", "method": "mse"},
        "ours JANG_2S (rtn)": {"profile": "JANG_2S", "method": "rtn"},
        "ours bits=2.5 (gptq, 32k calib)": {"bits": 2.5, "method": "gptq", "calib": 32768},
        "ours bits=3.0 (gptq, 32k calib)": {"bits": 3.0, "method": "gptq", "calib": 32768},
        "ours JANG_4K = bits=4.0 (gptq, 32k calib)": {"profile": "JANG_4K", "method": "gptq", "calib": 32768},
        "ours JANG_2M (gptq, 32k calib)": {"profile": "JANG_2M", "method": "gptq", "calib": 32768},
        "ours JANG_3M (gptq, 32k calib)": {"profile": "JANG_3M", "method": "gptq", "calib": 32768},
    },
    "smollm2": {  # the --bits 4 window's fixed profiles, with the calibration of the CPU rows (4096 tokens of
        # the previous default text: "calib4k-old", tokenized before calib.py changed)
        "ours JANG_1L (gptq)": {"profile": "JANG_1L", "method": "gptq", "calib": 4096, "pool": "calib4k-old"},
        "ours JANG_2L (gptq)": {"profile": "JANG_2L", "method": "gptq", "calib": 4096, "pool": "calib4k-old"},
        "ours JANG_3L (gptq)": {"profile": "JANG_3L", "method": "gptq", "calib": 4096, "pool": "calib4k-old"},
    },
}
# second run: GPTQ with plain min/max rounding for 2-bit gate/up (diagnosed on the CPU: GPTQ there hurt Qwen)
FOLLOWUP = {
    "qwen2.5-coder": {
        "ours JANG_2S (gptq, min/max gate-up)": {"profile": "JANG_2S", "method": "gptq", "calib": 4096,
                                                 "pool": "calib4k-old", "gptq_options": {"minmax_mlp_in_bits": 2}},
        "ours JANG_2S (gptq, 32k calib, min/max gate-up)": {"profile": "JANG_2S", "method": "gptq", "calib": 32768,
                                                            "gptq_options": {"minmax_mlp_in_bits": 2}},
    },
    "smollm2": {
        "ours JANG_2S (gptq, min/max gate-up)": {"profile": "JANG_2S", "method": "gptq", "calib": 4096,
                                                 "pool": "calib4k-old", "gptq_options": {"minmax_mlp_in_bits": 2}},
        "ours JANG_2S (rtn)": {"profile": "JANG_2S", "method": "rtn"},
    },
}
GGUF_NAMES = {"qwen2.5-coder": "qwen2.5-coder-0.5b-instruct.gguf", "smollm2": "SmolLM2-135M-Instruct.Q4_1.gguf"}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- stage (here)

def stage(a) -> int:
    import numpy as np

    sys.path.insert(0, str(REPO / "tests"))
    import realdata
    from quality import eval_ids  # bench/quality.py: transformers' GGUF tokenizer, as the anchors

    from types import SimpleNamespace

    from jang_serve.quantize.calib import calibration_tokens
    from jang_serve.quantize.evaluate import tokenizer_for

    ids_dir = STAGE / "ids"
    ids_dir.mkdir(parents=True, exist_ok=True)
    files = {"qwen2.5-coder": realdata.qwen25_coder_gguf(), "smollm2": realdata.smollm2_gguf()}
    for model, gguf in files.items():
        ev = eval_ids(gguf, "hf-gguf")[:TOKENS]
        cal = calibration_tokens(SimpleNamespace(tokenizer=tokenizer_for(gguf)), None, CALIB_POOL)
        if len(ev) < TOKENS or len(cal) < CALIB_POOL:
            raise SystemExit(f"{model}: too few tokens (eval {len(ev)}, calibration {len(cal)})")
        np.save(ids_dir / f"{model}-eval.npy", np.array(ev, np.int32))
        np.save(ids_dir / f"{model}-calib.npy", np.array(cal, np.int32))
        # the CPU default (4,096 tokens of the default text), exactly as convert() picks it
        np.save(ids_dir / f"{model}-calib4k.npy",
                np.array(calibration_tokens(SimpleNamespace(tokenizer=tokenizer_for(gguf)), None, 4096), np.int32))
        log(f"{model}: eval {len(ev)} ids, calibration {len(cal)} ids")
    # both GGUFs as one byte stream in pieces that fit one device call each
    order = ["smollm2", "qwen2.5-coder"]  # SmolLM2 first: its run can start while Qwen's pieces travel
    blob = b"".join(Path(files[m]).read_bytes() for m in order)
    sizes = {m: Path(files[m]).stat().st_size for m in order}
    for old in STAGE.glob("p*"):
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    n = math.ceil(len(blob) / a.piece)
    for i in range(n):
        d = STAGE / f"p{i + 1}"
        d.mkdir()
        (d / "piece").write_bytes(blob[i * a.piece : (i + 1) * a.piece])
    manifest = {"pieces": n, "sizes": sizes, "order": order,
                "sha256": {m: hashlib.sha256(Path(files[m]).read_bytes()).hexdigest() for m in files}}
    (ids_dir / "gguf.json").write_text(json.dumps(manifest, indent=1))
    log(f"{n} pieces of <= {a.piece} bytes under {STAGE}/p1..p{n}")
    return 0


def join_pieces(dest: Path, models) -> dict:
    """On the device: cut the GGUF files of `models` out of the pieces /tmp/q/p1.. and check their sha256."""
    manifest = json.loads((STAGE / "ids" / "gguf.json").read_text())
    blob = b"".join((dest / f"p{i}").read_bytes() for i in range(1, manifest["pieces"] + 1)
                    if (dest / f"p{i}").exists())
    at, out = 0, {}
    for m in manifest["order"]:
        size = manifest["sizes"][m]
        if m in models:
            p = dest / GGUF_NAMES[m]
            if len(blob) < at + size:
                raise SystemExit(f"{m}: pieces hold {len(blob) - at} of its {size} bytes")
            p.write_bytes(blob[at : at + size])
            got = hashlib.sha256(p.read_bytes()).hexdigest()
            if got != manifest["sha256"][m]:
                raise SystemExit(f"{p}: sha256 {got} != {manifest['sha256'][m]}")
            out[m] = p
            log(f"{p} joined, sha256 ok")
        at += size
    return out


# ---------------------------------------------------------------- convert (worker process)

def convert_one(a) -> int:
    import numpy as np

    import jang_serve  # noqa: F401
    import mlx.core as mx

    from jang_serve.quantize import convert

    mx.set_cache_limit(1 << 30)
    kw = json.loads(a.kwargs)
    n = kw.pop("calib", 4096)
    pool = kw.pop("pool", None) or ("calib4k" if n == 4096 else "calib")  # 4096 = the CPU default, exactly
    ids = np.load(STAGE / "ids" / f"{a.model}-{pool}.npy")[:n].tolist()
    t = time.time()
    r = convert(a.src, a.dest, calib=ids, calib_tokens=n, **kw)  # rtn / mse fixed profiles ignore calib
    (Path(a.dest) / "convert_seconds.json").write_text(json.dumps({"seconds": round(time.time() - t, 1),
                                                                    "calib_tokens": n}))
    log(f"converted {a.dest} ({r.average_bits:.3f} bits) in {time.time() - t:.0f}s")
    return 0


# ---------------------------------------------------------------- evaluation (GPU, driver process)

def windows_of(ids, tokens):
    ids = [int(x) for x in ids][:tokens]
    return [ids[i * WINDOW : (i + 1) * WINDOW] for i in range(len(ids) // WINDOW)]


def metrics(model, wins, kl_windows: int, ref_lp=None, keep: bool = False, per: int = 4):
    """(ppl, kl, top1, kept log-probs) over the windows; log-probs of the first `kl_windows` windows are
    kept in float16 (as evaluate.RefStore keeps the reference's) when `keep`."""
    import mlx.core as mx

    from jang_serve.quantize.bundle import batch_logits

    nll, n, kl, agree, nk, kept = 0.0, 0, 0.0, 0, 0, []
    for b in range(0, len(wins), per):
        outs = batch_logits(model, wins[b : b + per])
        for j, o in enumerate(outs):
            i = b + j
            lp = o[:-1] - mx.logsumexp(o[:-1], axis=-1, keepdims=True)
            tgt = mx.array(wins[i][1:])[:, None]
            nll += -float(mx.take_along_axis(lp, tgt, axis=-1).sum())
            n += len(wins[i]) - 1
            if i < kl_windows:
                if keep:
                    kept.append(lp.astype(mx.float16))
                    mx.eval(kept[-1])
                if ref_lp is not None:
                    r = ref_lp[i].astype(mx.float32)
                    kl += float((mx.exp(r) * (r - lp)).sum())
                    agree += int((mx.argmax(r, -1) == mx.argmax(lp, -1)).sum())
                    nk += lp.shape[0]
    return math.exp(nll / n), (kl / nk if nk else 0.0), (agree / nk if nk else 1.0), kept


def load_model(path: Path, reference: bool):
    import mlx.core as mx

    from jang_serve.quantize.evaluate import _load

    m = _load(path, reference)
    mx.eval(m.parameters())
    return m


def run(a) -> int:
    import numpy as np

    import jang_serve  # noqa: F401
    import mlx.core as mx

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    if a.smoke:
        sys.path.insert(0, str(REPO / "tests"))
        import realdata

        ggufs = {"smollm2": realdata.smollm2_gguf()}
        plan = {"smollm2": {"ours JANG_3L (gptq)": {"profile": "JANG_3L", "method": "gptq", "calib": 1024},
                            "ours bits=2.5 (gptq, 1k calib)": {"bits": 2.5, "method": "gptq", "calib": 1024},
                            "ours JANG_2S (rtn)": {"profile": "JANG_2S", "method": "rtn"}}}
        tokens, kl_tokens, held = 2 * WINDOW, WINDOW, WINDOW
    else:
        ggufs = join_pieces(Path(a.gguf_dir), a.models)
        plan = {m: (FOLLOWUP if a.followup else VARIANTS)[m] for m in a.models}
        tokens, kl_tokens, held = TOKENS, KL_TOKENS, HELD_OUT
    info = {"device": str(mx.default_device()), "mlx": mx.__version__, "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    try:
        import subprocess as sp

        info["gpu"] = sp.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True).stdout.strip()
    except OSError:
        info["gpu"] = None
    rows_path = out / "rows.json"
    rows = json.loads(rows_path.read_text()) if rows_path.exists() else {"info": info, "rows": {}}

    def save():
        rows_path.write_text(json.dumps(rows, indent=1))

    # 1) start the conversions: the longest (allocator, then gptq 32k) first, at most `jobs` at a time
    jobs = []
    for model, variants in plan.items():
        for name, kw in variants.items():
            dest = work / model / slug(name)
            if (dest / "convert_seconds.json").exists():
                continue
            cost = (3 if "bits" in kw or kw.get("profile", "").endswith("K") else 0) + (2 if kw.get("calib", 0) > 4096 else 0) \
                + (1 if kw.get("method") == "gptq" else 0) + (5 if model != "smollm2" else 0)
            args = [sys.executable, __file__, "convert-one", "--model", model, "--src", str(ggufs[model]),
                    "--dest", str(dest), "--kwargs", json.dumps(kw)]
            jobs.append((-cost, name, model, dest, args))
    jobs.sort()
    running, pending = [], list(jobs)
    logs = out / "convert-logs"
    logs.mkdir(exist_ok=True)

    def pump():
        while pending and len(running) < a.jobs:
            _, name, model, dest, args = pending.pop(0)
            dest.parent.mkdir(parents=True, exist_ok=True)
            f = open(logs / f"{model}-{slug(name)}.log", "w")
            running.append((name, model, dest, subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT), f))
            log(f"started {model}: {name}")
        for r in list(running):
            if r[3].poll() is not None:
                running.remove(r)
                r[4].close()
                if r[3].returncode:
                    rows["rows"].setdefault(r[1], {})[r[0]] = {"failed": f"convert exited {r[3].returncode}"}
                    log(f"FAILED {r[1]}: {r[0]} (see {logs})")
                    save()

    pump()
    # 2) while they run: the references, then each bundle as soon as it exists
    for model in plan:
        ev = np.load(STAGE / "ids" / f"{model}-eval.npy") if not a.smoke else None
        cal = np.load(STAGE / "ids" / f"{model}-calib.npy")
        if a.smoke:
            from quality import eval_ids

            ev = np.array(eval_ids(ggufs[model], "hf-gguf")[:tokens])
        wins, held_wins = windows_of(ev, tokens), windows_of(cal[CALIB_POOL - held:], held)
        klw = kl_tokens // WINDOW
        done = rows["rows"].setdefault(model, {})
        t = time.time()
        ref = load_model(ggufs[model], True)
        ppl, _, _, ref_lp = metrics(ref, wins, klw, keep=True)
        hppl, _, _, _ = metrics(ref, held_wins, 0)
        del ref
        done["reference (GGUF dequantized, bf16)"] = {"ppl": ppl, "kl": 0.0, "top1": 1.0, "heldout_calib_ppl": hppl,
                                                      "average_bits": 16.0, "eval_s": round(time.time() - t, 1)}
        save()
        log(f"{model} reference: ppl {ppl:.3f}, held-out calibration ppl {hppl:.3f}")
        todo = [n for n in plan[model]]
        while todo:
            pump()
            ready = [n for n in todo if (work / model / slug(n) / "convert_seconds.json").exists()]
            failed = [n for n in todo if "failed" in done.get(n, {})]
            for n in failed:
                todo.remove(n)
            if not ready:
                if not running and not pending and todo and not failed:
                    raise SystemExit(f"nothing running and {todo} not converted")
                time.sleep(2)
                continue
            name = ready[0]
            todo.remove(name)
            dest = work / model / slug(name)
            t = time.time()
            m = load_model(dest, False)
            ppl, kl, top1, _ = metrics(m, wins, klw, ref_lp=ref_lp)
            hppl, _, _, _ = metrics(m, held_wins, 0)
            del m
            from jang_serve.quantize.evaluate import model_bits

            bits, size = model_bits(dest)
            q = json.loads((dest / "jang_config.json").read_text())["quantization"]
            cs = json.loads((dest / "convert_seconds.json").read_text())
            done[name] = {"ppl": ppl, "kl": kl, "top1": top1, "heldout_calib_ppl": hppl, "average_bits": bits,
                          "size_bytes": size, "mb": round(size / 1e6, 1), "convert_s": cs["seconds"],
                          "eval_s": round(time.time() - t, 1), "profile": q["profile"], "method": q["method"],
                          "nominal_bits": q["nominal_bits"], "target_bits": q["target_bits"],
                          "calibration": q.get("calibration")}
            save()
            log(f"{model} {name}: {bits:.3f} bits ppl {ppl:.3f} KL {kl:.4f} top1 {top1:.3f} held-out {hppl:.3f}")
        del ref_lp
        mx.clear_cache()
    while running or pending:
        pump()
        time.sleep(2)
    rows["info"]["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    save()
    log(f"wrote {rows_path}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("stage")
    s.add_argument("--piece", type=int, default=60_000_000)
    c = sub.add_parser("convert-one")
    for k in ("--model", "--src", "--dest", "--kwargs"):
        c.add_argument(k, required=True)
    r = sub.add_parser("run")
    r.add_argument("--out", default=os.environ.get("OUT", "/tmp/qout"))
    r.add_argument("--work", default="/tmp/qwork")
    r.add_argument("--gguf-dir", default="/tmp/q")
    r.add_argument("--models", nargs="*", default=["qwen2.5-coder", "smollm2"])
    r.add_argument("--jobs", type=int, default=12)
    r.add_argument("--smoke", action="store_true")
    r.add_argument("--followup", action="store_true", help="the second run's variants (FOLLOWUP)")
    rp = sub.add_parser("report")
    rp.add_argument("rows")
    rp.add_argument("--dest-dir", default=str(REPO / "bench" / "results"))
    a = ap.parse_args()
    sys.path.insert(0, str(REPO / "bench"))
    if a.cmd == "report":
        from quality_gpu_report import report  # bench/quality_gpu_report.py

        return report(a)
    return {"stage": stage, "convert-one": convert_one, "run": run}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
