"""One benchmark plan run against one or two servers: build bodies, run levels, collect figures."""

from __future__ import annotations

import asyncio
import statistics
from dataclasses import dataclass, field

import httpx

from .prompts import Tokens, load_jsonl, synthetic
from .runner import run_closed_loop, run_poisson
from .stats import summarize


@dataclass
class Target:
    """A server to measure: its base URL and the model name to put in requests."""

    name: str
    url: str
    model: str
    command: list[str] | None = None  # when this invocation started the server


@dataclass
class Plan:
    concurrency: list[int] = field(default_factory=lambda: [1, 4, 16, 64])
    rate: float | None = None  # requests/s, Poisson open loop (replaces concurrency levels)
    requests: int | list[int] | None = None  # per level (one number, or one per level); None = max(8, 2 * concurrency)
    prompts: str = "synthetic"
    prompt_tokens: int = 128
    max_tokens: int = 64
    endpoint: str = "completions"  # or "chat"
    fixed_length: str = "both"  # ignore_eos | logit_bias | both | none
    eos_ids: list[int] = field(default_factory=list)
    repeat: int = 1
    warmup: int = 2
    seed: int = 0
    warmup_levels: bool = False  # one unmeasured round at each level's concurrency first (GPU: compiles)
    fresh_prompts: bool = True  # every level and repeat gets prompts no server has seen (no prefix-cache hits)

    def n_requests(self, level: int) -> int:
        if isinstance(self.requests, list):
            if self.rate or len(self.requests) == 1:
                return self.requests[0]
            return self.requests[self.concurrency.index(level)]
        return self.requests or max(8, 2 * level)

    def n_bodies(self) -> int:
        """Distinct bodies the plan needs: warm-up, level warm-ups, then one slice per (repeat, level)."""
        lv = [lvl for _, lvl in self.levels()]
        if not self.fresh_prompts:
            return max(self.n_requests(x) for x in lv) + self.warmup + (max(lv) if self.warmup_levels else 0)
        level_warm = sum(max(1, x) for x in lv) if self.warmup_levels else 0
        return self.warmup + level_warm + self.repeat * sum(self.n_requests(x) for x in lv)

    def levels(self) -> list[tuple[str, int]]:
        if self.rate:
            return [("rate", 0)]
        return [("concurrency", c) for c in self.concurrency]


class Bodies:
    """The request bodies of one run; identical for every target (only `model` differs)."""

    def __init__(self, plan: Plan, tokens: Tokens | None):
        self.plan = plan
        n = plan.n_bodies()
        if plan.prompts == "synthetic":
            texts = synthetic(n, plan.prompt_tokens, seed=plan.seed, tokens=tokens)
            if plan.endpoint == "chat":
                self.rows = [{"messages": [{"role": "user", "content": t}]} for t in texts]
            else:
                self.rows = [{"prompt": t} for t in texts]
        else:
            self.rows = load_jsonl(plan.prompts)
        self.extra: dict = {"temperature": 0.0}
        if plan.fixed_length in ("ignore_eos", "both"):
            self.extra["ignore_eos"] = True
        if plan.fixed_length in ("logit_bias", "both") and plan.eos_ids:
            self.extra["logit_bias"] = {str(i): -100.0 for i in plan.eos_ids}

    def path(self) -> str:
        if self.plan.prompts != "synthetic":
            return "/v1/chat/completions" if "messages" in self.rows[0] else "/v1/completions"
        return "/v1/chat/completions" if self.plan.endpoint == "chat" else "/v1/completions"

    def body(self, model: str, i: int) -> dict:
        row = self.rows[i % len(self.rows)]
        b = {**self.extra, **row, "model": model}
        b.setdefault("max_tokens", self.plan.max_tokens)
        return b


async def _one_level(target: Target, bodies: Bodies, plan: Plan, level: int, offset: int) -> tuple[list, float]:
    url = target.url.rstrip("/") + bodies.path()
    n = plan.n_requests(level)
    fn = lambda i: bodies.body(target.model, offset + i)  # noqa: E731
    if plan.rate:
        return await run_poisson(url, fn, n, plan.rate, seed=plan.seed)
    return await run_closed_loop(url, fn, n, level)


def warm_up(target: Target, bodies: Bodies, plan: Plan) -> dict:
    """A few requests (not measured) so both servers have loaded and compiled before timing."""
    if plan.warmup <= 0:
        return {}
    url = target.url.rstrip("/") + bodies.path()
    n = max(1, plan.warmup)
    fn = lambda i: bodies.body(target.model, i)  # noqa: E731
    res, wall = asyncio.run(run_closed_loop(url, fn, n, min(2, n)))
    s = summarize(res, wall)
    if s["completed"] == 0:
        raise RuntimeError(f"{target.name}: every warm-up request failed: {s['errors']}")
    return s


def _warm_levels(targets: list[Target], bodies: Bodies, plan: Plan, offset: int, log=print) -> int:
    """One unmeasured round per level: `level` requests at concurrency `level`, on every target."""
    for kind, level in plan.levels():
        n = max(1, level)
        for t in targets:
            url = t.url.rstrip("/") + bodies.path()
            fn = lambda i, o=offset, m=t.model: bodies.body(m, o + i)  # noqa: E731
            res, wall = asyncio.run(run_closed_loop(url, fn, n, n))
            log(f"  warm-up {t.name:<12} {kind}={level}: {summarize(res, wall)['completed']}/{n} ok", flush=True)
        offset += n
    return offset


def run(targets: list[Target], plan: Plan, bodies: Bodies, log=print) -> list[dict]:
    """Run every level for every target, interleaved A B A B per level, `repeat` times. Both targets
    get the same bodies for a (repeat, level); with fresh_prompts each (repeat, level) has its own."""
    for t in targets:
        warm_up(t, bodies, plan)
    offset = plan.warmup
    if plan.warmup_levels and not plan.rate:
        after = _warm_levels(targets, bodies, plan, offset, log)
        offset = after if plan.fresh_prompts else offset
    runs = []
    for rep in range(plan.repeat):
        for kind, level in plan.levels():
            for t in targets:
                res, wall = asyncio.run(_one_level(t, bodies, plan, level, offset))
                s = summarize(res, wall)
                runs.append({"target": t.name, "repeat": rep, "mode": kind,
                             "concurrency": level if kind == "concurrency" else None,
                             "bodies": [offset, offset + plan.n_requests(level)],  # the prompt rows it sent
                             "rate": plan.rate, "summary": s, "raw": [r.to_json() for r in res]})
                log(f"  [{rep + 1}/{plan.repeat}] {t.name:<12} {kind}={level if level else plan.rate}: "
                    f"{s['completed']}/{s['requests']} ok, {s['output_token_throughput'] or 0:.1f} out tok/s", flush=True)
            if plan.fresh_prompts:
                offset += plan.n_requests(level)
    return runs


def _metric(run: dict, key: str) -> float | None:
    s = run["summary"]
    if "." in key:
        a, b = key.split(".")
        return s[a][b]
    return s[key]


AGG_KEYS = ["output_token_throughput", "request_throughput", "ttft_s.p50", "ttft_s.p99", "tpot_s.p50",
            "tpot_s.p95", "tpot_s.p99", "itl_s.p50", "itl_s.p99", "failed"]


def aggregate(runs: list[dict]) -> list[dict]:
    """Median, min and max over repeats, per target and level."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["target"], r["mode"], r["concurrency"]), []).append(r)
    out = []
    for (target, mode, level), rs in groups.items():
        row = {"target": target, "mode": mode, "concurrency": level, "repeats": len(rs)}
        for k in AGG_KEYS:
            vals = [v for v in (_metric(r, k) for r in rs) if v is not None]
            row[k] = {"median": statistics.median(vals) if vals else None, "min": min(vals, default=None),
                      "max": max(vals, default=None)}
        # the tail goal: p99 TPOT over p50 TPOT within each run, median over repeats
        tail = [r["summary"]["tpot_s"]["p99"] / r["summary"]["tpot_s"]["p50"] for r in rs
                if r["summary"]["tpot_s"]["p50"]]
        row["tpot_p99_over_p50"] = {"median": statistics.median(tail) if tail else None,
                                    "min": min(tail, default=None), "max": max(tail, default=None)}
        out.append(row)
    return out


RATIO_KEYS = ["output_token_throughput", "request_throughput", "ttft_s.p50", "tpot_s.p50", "tpot_s.p99"]


def ratios(runs: list[dict], ours: str, base: str) -> list[dict]:
    """ours / base per level, paired within each repeat (A and B ran back to back), then
    median, min and max over repeats. Throughput ratio > 1 = ours faster; latency ratio < 1 = ours faster."""
    pairs: dict[tuple, dict] = {}
    for r in runs:
        pairs.setdefault((r["concurrency"], r["repeat"]), {})[r["target"]] = r
    levels: dict = {}
    for (level, _rep), p in pairs.items():
        if ours in p and base in p:
            levels.setdefault(level, []).append((p[ours], p[base]))
    out = []
    for level, ps in levels.items():
        row: dict = {"concurrency": level, "repeats": len(ps)}
        for k in RATIO_KEYS:
            vals = []
            for a, b in ps:
                x, y = _metric(a, k), _metric(b, k)
                if x is not None and y:
                    vals.append(x / y)
            row[k] = {"median": statistics.median(vals) if vals else None, "min": min(vals, default=None),
                      "max": max(vals, default=None), "values": vals}
        out.append(row)
    return out


def server_info(url: str) -> dict:
    """What the server says about itself (/v1/models), for the record."""
    try:
        return httpx.get(url.rstrip("/") + "/v1/models", timeout=10).json()
    except (httpx.HTTPError, ValueError) as e:
        return {"error": str(e)}
