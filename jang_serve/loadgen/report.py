"""The printed table and the JSON record of a benchmark."""

from __future__ import annotations

import json
from pathlib import Path


def _ms(x):
    return "-" if x is None else f"{x * 1000:.1f}"


def _f(x, nd=1):
    return "-" if x is None else f"{x:.{nd}f}"


def table(agg: list[dict], ratios: list[dict] | None = None) -> str:
    """A plain-text table: medians over repeats (ms for latencies)."""
    head = ["server", "conc", "out tok/s", "req/s", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99",
            "ITL p99", "TPOT p99/p50", "failed", "reps"]
    rows = [head]
    for a in sorted(agg, key=lambda a: (a["concurrency"] or 0, a["target"])):
        m = lambda k: a[k]["median"]  # noqa: E731
        rows.append([a["target"], str(a["concurrency"] if a["concurrency"] is not None else "rate"),
                     _f(m("output_token_throughput")), _f(m("request_throughput"), 2), _ms(m("ttft_s.p50")),
                     _ms(m("ttft_s.p99")), _ms(m("tpot_s.p50")), _ms(m("tpot_s.p99")), _ms(m("itl_s.p99")),
                     _f(m("tpot_p99_over_p50"), 2), _f(m("failed"), 0), str(a["repeats"])])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if ratios:
        lines.append("")
        lines.append("ratios ours/baseline (median [min..max] over repeats; throughput >1 and latency <1 = ours better)")
        for r in sorted(ratios, key=lambda r: r["concurrency"] or 0):
            parts = []
            for k, label in (("output_token_throughput", "out tok/s"), ("ttft_s.p50", "TTFT p50"),
                             ("tpot_s.p50", "TPOT p50"), ("tpot_s.p99", "TPOT p99")):
                v = r[k]
                if v["median"] is not None:
                    parts.append(f"{label} {v['median']:.2f}x [{v['min']:.2f}..{v['max']:.2f}]")
            lines.append(f"  conc {r['concurrency']}: " + ", ".join(parts))
    return "\n".join(lines)


def write_json(path: str | Path, record: dict) -> None:
    """Write atomically: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=False) + "\n")
    tmp.replace(path)


def _served_line(record: dict) -> str:
    served = record.get("served") or {}
    parts = []
    for name, info in served.items():
        bits = info.get("average_bits")
        desc = Path(info.get("made_from") or info["path"]).name
        if info.get("profile"):
            desc += f" ({info['profile']}, {bits} bits/weight" if bits else f" ({info['profile']}"
            desc += f", module bits {info.get('module_bits')})"
        elif info.get("bits"):
            desc += f" ({info['bits']}-bit, group {info.get('group_size')})"
        parts.append(f"{name}: {desc}, floats stored as {'/'.join(info.get('float_dtypes') or []) or '-'}")
    return "; ".join(parts)


def markdown(record: dict) -> str:
    """A README table from a side-by-side record: setting lines, then one row per level (medians over
    repeats; the ratio columns give median [min..max] of the per-repeat paired ratios)."""
    env, st = record["environment"], record["settings"]
    v = env["versions"]
    reqs = st.get("requests")
    lines = [
        f"Device: {env['device']} ({env['cores']} cores{', load average ' + str(env['loadavg'][0]) if env.get('loadavg') else ''})"
        f" · {env['date'][:16].replace('T', ' ')} UTC · mlx {v['mlx']} · mlx-lm {v['mlx-lm']}"
        f" · jang-serve {(env.get('jang_serve_commit') or '?')[:12]}",
        f"Model: {_served_line(record) or record['targets'][0]['model']}",
        f"Load: closed loop, prompt {st['prompt_tokens']} tok, output {st['max_tokens']} tok (greedy, fixed length), "
        f"requests per level {reqs if reqs else 'max(8, 2 x clients)'}, {st['repeat']} repeats interleaved A B",
        "",
        "| clients | jang-serve out tok/s | mlx-lm out tok/s | throughput ratio | TTFT p50 ms (ours / mlx-lm) "
        "| TPOT p50 ms (ours / mlx-lm) | TPOT p99/p50 (ours / mlx-lm) |",
        "|---|---|---|---|---|---|---|",
    ]
    agg = {(a["target"], a["concurrency"]): a for a in record["aggregate"]}
    ours = record["targets"][0]["name"]

    def rng(d, nd=2, suffix="x"):
        if d["median"] is None:
            return "-"
        return f"{d['median']:.{nd}f}{suffix} [{d['min']:.{nd}f}..{d['max']:.{nd}f}]"

    def pair(a, b, key, scale=1.0, nd=0):
        f = lambda x: "-" if x is None else f"{x * scale:.{nd}f}"  # noqa: E731
        return f"{f(a[key]['median'])} / {f(b[key]['median'])}"

    for r in sorted(record.get("ratios") or [], key=lambda r: r["concurrency"] or 0):
        c = r["concurrency"]
        a, b = agg[(ours, c)], agg[("mlx-lm", c)]
        lines.append(f"| {c} | {rng(a['output_token_throughput'], 1, '')} | {rng(b['output_token_throughput'], 1, '')} "
                     f"| {rng(r['output_token_throughput'])} | {pair(a, b, 'ttft_s.p50', 1000)} "
                     f"| {pair(a, b, 'tpot_s.p50', 1000)} | {pair(a, b, 'tpot_p99_over_p50', nd=2)} |")
    return "\n".join(lines)
