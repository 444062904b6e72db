"""Percentiles and throughput over a list of RequestResults."""

from __future__ import annotations

import math
from typing import Iterable, Sequence

from .client import RequestResult


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100); None for an empty list."""
    xs = sorted(values)
    if not xs:
        return None
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def dist(values: Iterable[float]) -> dict:
    """mean, p50, p95, p99, min, max, n of a list of seconds."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return {"n": 0, "mean": None, "p50": None, "p95": None, "p99": None, "min": None, "max": None}
    return {
        "n": len(xs), "mean": sum(xs) / len(xs), "p50": percentile(xs, 50), "p95": percentile(xs, 95),
        "p99": percentile(xs, 99), "min": xs and min(xs), "max": xs and max(xs),
    }


def summarize(results: list[RequestResult], wall_s: float) -> dict:
    """Aggregate figures of one load run: latencies, throughputs, errors."""
    done = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in done)
    in_tokens = sum(r.prompt_tokens or 0 for r in done)
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok and not r.aborted:
            key = (r.error or "unknown")[:120]
            errors[key] = errors.get(key, 0) + 1
    itls = [x for r in done for x in r.itls]
    return {
        "requests": len(results),
        "completed": len(done),
        "failed": sum(errors.values()),
        "aborted": sum(r.aborted for r in results),
        "retried": sum(r.attempts > 1 for r in results),
        "errors": errors,
        "wall_s": wall_s,
        "request_throughput": len(done) / wall_s if wall_s > 0 else None,
        "output_token_throughput": out_tokens / wall_s if wall_s > 0 else None,
        "total_token_throughput": (out_tokens + in_tokens) / wall_s if wall_s > 0 else None,
        "prompt_tokens": in_tokens,
        "output_tokens": out_tokens,
        "output_tokens_per_request": dist(r.output_tokens for r in done),
        "usage_reported": sum(r.completion_tokens is not None for r in done),
        "ttft_s": dist(r.ttft for r in done),
        "tpot_s": dist(r.tpot for r in done),
        "itl_s": dist(itls),
        "latency_s": dist(r.latency for r in done),
    }
