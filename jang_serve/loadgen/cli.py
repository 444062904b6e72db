"""`jangq bench serve`: the serving benchmark from the command line."""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from pathlib import Path

from . import bench, envinfo, report
from .prompts import Tokens
from .servers import ServerProcess, jang_serve_cmd, mlx_lm_cmd


def _ints(s: str) -> list[int]:
    try:
        vals = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {s!r}")
    return vals


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jangq bench serve",
                                description="Load-test an OpenAI-compatible server (optionally side by side with mlx-lm).")
    t = p.add_argument_group("the server under test (one of)")
    t.add_argument("--url", help="base URL of a running server, e.g. http://127.0.0.1:8000")
    t.add_argument("--serve-model", help="start jang-serve on this model on a free loopback port "
                                         "('default' = its embedded default model)")
    t.add_argument("--target-cmd", help="start this command instead ({port} is replaced by a free port)")
    t.add_argument("--serve-args", default="", help="extra arguments for jang-serve (--serve-model)")
    t.add_argument("--model", help="model name to send in requests (default: what /v1/models lists first)")
    t.add_argument("--ready-path", default="/health", help="GET path that answers 200 once a started server is ready")
    t.add_argument("--name", default="jang-serve", help="label of the server under test in the results")
    b = p.add_argument_group("baseline")
    b.add_argument("--baseline", choices=["mlx-lm"], help="also start mlx_lm.server and run the same load on it")
    b.add_argument("--baseline-model", help="a .gguf (converted once, cached under .cache/bench) or an mlx-lm folder")
    b.add_argument("--baseline-bits", type=int, default=4, help="bits for the baseline conversion (0 = none)")
    b.add_argument("--baseline-group-size", type=int, default=64)
    b.add_argument("--baseline-dtype", default="auto",
                   help="dtype of the baseline's float tensors (auto = float32 on CPU, bfloat16 on GPU, as jang-serve); "
                        "a model folder in another dtype is served from a cast copy")
    b.add_argument("--baseline-args", default="", help="extra arguments for mlx_lm.server")
    l = p.add_argument_group("load")
    l.add_argument("--concurrency", type=_ints, default=[1, 4, 16, 64], help="closed-loop levels, e.g. 1,4,16,64")
    l.add_argument("--rate", type=float, help="Poisson arrival rate in requests/s (open loop; replaces --concurrency)")
    l.add_argument("--requests", type=_ints, help="requests per level: one number, or one per --concurrency level "
                                                 "(e.g. 4,8,16); default max(8, 2 x concurrency)")
    l.add_argument("--prompts", default="synthetic", help="'synthetic' or a JSONL file of request bodies")
    l.add_argument("--prompt-tokens", type=int, default=128)
    l.add_argument("--max-tokens", type=int, default=64)
    l.add_argument("--endpoint", choices=["completions", "chat"], default="completions",
                   help="for synthetic prompts: /v1/completions or /v1/chat/completions")
    l.add_argument("--tokenizer", help="model folder whose tokenizer.json sizes the prompts exactly and names EOS")
    l.add_argument("--eos-ids", type=_ints, help="EOS token ids to bias away (fixed output length)")
    l.add_argument("--fixed-length", choices=["both", "ignore_eos", "logit_bias", "none"], default="both",
                   help="how to make every request generate exactly --max-tokens")
    l.add_argument("--repeat", type=int, default=1, help="repeat the whole plan; report median and spread")
    l.add_argument("--warmup", type=int, default=2, help="unmeasured requests per server first")
    l.add_argument("--seed", type=int, default=0)
    l.add_argument("--warmup-levels", action="store_true",
                   help="before timing, one unmeasured round at each level's concurrency on every server "
                        "(GPU: compiles the kernels of every batch size)")
    l.add_argument("--reuse-prompts", action="store_true",
                   help="send the same prompts at every level and repeat (default: fresh ones each time, "
                        "so no server answers from its prefix cache)")
    p.add_argument("--json", help="write the full record (settings, environment, raw figures) here")
    p.add_argument("--note", help="a note for the record (e.g. 'machine shared with other jobs')")
    p.add_argument("--log-dir", help="server logs go here (default: a temporary folder)")
    p.add_argument("--start-timeout", type=float, default=600.0, help="seconds to wait for a server to start")
    return p


def _dtype(name: str) -> str:
    if name != "auto":
        return name
    import mlx.core as mx

    return "bfloat16" if mx.default_device() == mx.gpu else "float32"


def _served(args, baseline_dir) -> dict:
    """What each started server was given (format, bits, dtypes), for the record."""
    from .baseline import describe_model

    out = {}
    if args.serve_model and args.serve_model != "default" and Path(args.serve_model).exists():
        out[args.name] = describe_model(args.serve_model)
    if baseline_dir is not None:
        out["mlx-lm"] = describe_model(baseline_dir)
        if Path(args.baseline_model).resolve() != Path(baseline_dir).resolve():
            out["mlx-lm"]["made_from"] = str(args.baseline_model)
    return out


def _first_model(url: str) -> str:
    info = bench.server_info(url)
    data = info.get("data") or []
    if not data:
        raise SystemExit(f"error: {url}/v1/models lists no model ({info}); pass --model")
    return data[0]["id"]


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    given = [x for x in (args.url, args.serve_model, args.target_cmd) if x]
    if len(given) != 1:
        raise SystemExit("error: give exactly one of --url, --serve-model, --target-cmd")
    if args.baseline and not args.baseline_model:
        raise SystemExit("error: --baseline mlx-lm needs --baseline-model (a .gguf or an mlx-lm folder)")
    if args.requests and len(args.requests) > 1 and (args.rate or len(args.requests) != len(args.concurrency)):
        raise SystemExit("error: --requests takes one number, or one per --concurrency level")
    if args.prompts != "synthetic" and not Path(args.prompts).exists():
        raise SystemExit(f"error: --prompts {args.prompts}: no such file")

    env = envinfo.environment()  # taken before the servers start: the commit and date they ran with
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="jang-bench-"))
    levels = [args.rate] if args.rate else args.concurrency
    started: list[ServerProcess] = []
    try:
        baseline_dir = None
        if args.baseline:
            from .baseline import mlx_lm_folder

            print(f"baseline model: preparing mlx-lm folder from {args.baseline_model} ...", flush=True)
            baseline_dir = mlx_lm_folder(args.baseline_model, args.baseline_bits, args.baseline_group_size,
                                         _dtype(args.baseline_dtype))
            print(f"baseline model: {baseline_dir}", flush=True)
        tok_dir = args.tokenizer or baseline_dir
        tokens = Tokens(tok_dir) if tok_dir else None
        eos = args.eos_ids or (tokens.eos_ids() if tokens else [])

        plan = bench.Plan(concurrency=args.concurrency, rate=args.rate, requests=args.requests,
                          prompts=args.prompts, prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens,
                          endpoint=args.endpoint, fixed_length=args.fixed_length, eos_ids=eos,
                          repeat=args.repeat, warmup=args.warmup, seed=args.seed,
                          warmup_levels=args.warmup_levels, fresh_prompts=not args.reuse_prompts)

        targets = []
        if args.url:
            targets.append(bench.Target(args.name, args.url, args.model or _first_model(args.url)))
        else:
            extra = shlex.split(args.serve_args)
            if "--max-num-seqs" not in extra:  # let it batch as many as the baseline may (fair comparison)
                extra += ["--max-num-seqs", str(int(max(levels)) if not args.rate else 64)]
            model = None if args.serve_model == "default" else args.serve_model
            cmd = shlex.split(args.target_cmd) if args.target_cmd else jang_serve_cmd(model, extra)
            srv = ServerProcess(cmd, args.name, log_path=log_dir / f"{args.name}.log", ready_path=args.ready_path)
            print(f"starting {args.name}: {shlex.join(srv.cmd)}", flush=True)
            started.append(srv.start(args.start_timeout))
            targets.append(bench.Target(args.name, srv.url, args.model or _first_model(srv.url), srv.cmd))
        if baseline_dir is not None:
            dc = max(levels) if not args.rate else 64
            srv = ServerProcess(mlx_lm_cmd(baseline_dir, int(max(dc, 1)), shlex.split(args.baseline_args)),
                                "mlx-lm", log_path=log_dir / "mlx-lm.log", ready_path="/health")
            print(f"starting mlx-lm: {shlex.join(srv.cmd)}", flush=True)
            started.append(srv.start(args.start_timeout))
            targets.append(bench.Target("mlx-lm", srv.url, "default_model", srv.cmd))

        infos = {t.name: bench.server_info(t.url) for t in targets}
        print(f"load: {'Poisson %.2f req/s' % args.rate if args.rate else 'concurrency ' + ','.join(map(str, args.concurrency))}, "
              f"prompts {args.prompts} ({args.prompt_tokens} tok), max_tokens {args.max_tokens}, "
              f"repeat {args.repeat}, eos bias {eos}", flush=True)
        bodies = bench.Bodies(plan, tokens)
        try:
            runs = bench.run(targets, plan, bodies)
        except RuntimeError as e:
            raise SystemExit(f"error: {e}") from None
    finally:
        for s in started:
            s.stop()

    agg = bench.aggregate(runs)
    rat = bench.ratios(runs, targets[0].name, "mlx-lm") if baseline_dir is not None else None
    print()
    print(report.table(agg, rat))
    if args.json:
        record = {
            "kind": "serve-bench",
            "environment": {**env, "finished": {"date": envinfo.environment()["date"], "loadavg": envinfo.loadavg()}},
            "note": args.note,
            "argv": sys.argv[1:] if argv is None else list(argv),
            "settings": {**vars(plan), "endpoint_path": bodies.path(), "request_extra": bodies.extra},
            "targets": [{"name": t.name, "url": t.url, "model": t.model, "command": t.command,
                         "models": infos.get(t.name)} for t in targets],
            "baseline_model_dir": str(baseline_dir) if baseline_dir else None,
            "served": _served(args, baseline_dir),
            "aggregate": agg,
            "ratios": rat,
            "runs": runs,
        }
        report.write_json(args.json, record)
        print(f"\nwrote {args.json}")
        if rat:
            print("\n" + report.markdown(record))
    failed = sum(r["summary"]["failed"] for r in runs)
    return 1 if failed and all(r["summary"]["completed"] == 0 for r in runs) else 0
