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


def markdown(record: dict) -> str:
    """A short README table from a side-by-side record: setting lines, then one row per level."""
    env, st = record["environment"], record["settings"]
    v = env["versions"]
    lines = [
        f"Device: {env['device']} ({env['cores']} cores) · date {env['date'][:10]} · mlx {v['mlx']} · mlx-lm {v['mlx-lm']}"
        f" · jang-serve {(env.get('jang_serve_commit') or '?')[:12]}",
        f"Model: {record['targets'][0]['model']} vs mlx-lm {Path(record.get('baseline_model_dir') or '?').name}"
        f" · prompt {st['prompt_tokens']} tok, output {st['max_tokens']} tok, greedy · {st['repeat']} repeats, "
        "median [min..max]",
        "",
        "| clients | jang-serve out tok/s | mlx-lm out tok/s | throughput ratio | TTFT p50 ratio | TPOT p50 ratio "
        "| jang-serve TPOT p99/p50 |",
        "|---|---|---|---|---|---|---|",
    ]
    agg = {(a["target"], a["concurrency"]): a for a in record["aggregate"]}
    ours = record["targets"][0]["name"]

    def rng(d, nd=2, suffix="x"):
        if d["median"] is None:
            return "-"
        return f"{d['median']:.{nd}f}{suffix} [{d['min']:.{nd}f}..{d['max']:.{nd}f}]"

    for r in sorted(record.get("ratios") or [], key=lambda r: r["concurrency"] or 0):
        c = r["concurrency"]
        a, b = agg[(ours, c)], agg[("mlx-lm", c)]
        lines.append(f"| {c} | {rng(a['output_token_throughput'], 1, '')} | {rng(b['output_token_throughput'], 1, '')} "
                     f"| {rng(r['output_token_throughput'])} | {rng(r['ttft_s.p50'])} | {rng(r['tpot_s.p50'])} "
                     f"| {rng(a['tpot_p99_over_p50'])} |")
    return "\n".join(lines)
