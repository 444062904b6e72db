"""POST /v1/completions: raw prompt(s) -> text_completion (or a stream of them).

`prompt` may be a string, a list of strings, a list of token ids or a list of token-id lists;
each prompt is its own engine request, and choice indexes run prompt by prompt (n per prompt).
With a non-empty `suffix` each prompt is the text before a gap and the model writes the middle
(fill-in-the-middle, engine/fim.py): models without FIM tokens answer 400.
"""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Depends, Request

from jang_serve.engine.fim import FimTokens, fim_prompt, fim_tokens

from ..auth import require_api_key
from ..errors import bad_request
from ..generation import (Admission, completion_logprobs, new_id, resolve_max_tokens, response_format_dict,
                          run_until_disconnect, sampling_params, start_generation, usage)
from ..metrics import RequestTimer
from ..schemas import CompletionRequest
from ..streaming import Chunks, done, error_chunk, sse_response

router = APIRouter()


def _fim(req: CompletionRequest, entry) -> FimTokens | None:
    if not req.suffix:
        return None
    fim = fim_tokens(entry.tokenizer)
    if fim is None:
        raise bad_request(f"model {entry.name!r} has no fill-in-the-middle tokens, so it cannot complete "
                          "between a prompt and a suffix; use a code model trained for infilling "
                          "(e.g. Qwen2.5-Coder, StarCoder) or leave suffix out", param="suffix",
                          code="invalid_value")
    return fim


def prompts_of(req: CompletionRequest, tokenizer, fim: FimTokens | None = None) -> list[tuple[str, list[int]]]:
    """(prompt text, token ids) per prompt; string prompts get the tokenizer's special tokens (BOS).
    With `fim`, each prompt becomes the prefix of an infill prompt around `req.suffix`."""
    p = req.prompt
    vocab = getattr(tokenizer, "vocab_size", None)
    if isinstance(p, str):
        items = [p]
    elif all(isinstance(x, int) for x in p):
        items = [list(p)]
    else:
        items = list(p)
    out = []
    for k, item in enumerate(items):
        if isinstance(item, str):
            if fim:
                out.append((item, fim_prompt(tokenizer, fim, item, req.suffix)))
            else:
                out.append((item, tokenizer.encode(item, add_special_tokens=True)))
            continue
        bad = [t for t in item if t < 0 or (vocab is not None and t >= vocab)]
        if bad:
            raise bad_request(f"prompt[{k}] holds token ids outside the vocabulary (size {vocab}): {bad[:5]}",
                              param="prompt")
        out.append((tokenizer.decode(item), fim_prompt(tokenizer, fim, list(item), req.suffix) if fim else list(item)))
    if not all(ids for _, ids in out):
        raise bad_request("a prompt encodes to zero tokens", param="prompt")
    return out


@router.post("/v1/completions", dependencies=[Depends(require_api_key)])
async def completions(body: CompletionRequest, request: Request):
    app = request.app
    entry = app.state.models.get(body.model)
    fim = _fim(body, entry)
    prompts = prompts_of(body, entry.tokenizer, fim)
    top = body.logprobs or 0
    jobs = []
    for text, ids in prompts:
        max_tokens = resolve_max_tokens(entry, len(ids), body.max_tokens, "prompt")
        params = sampling_params(body, entry, max_tokens, logprobs=body.logprobs is not None, top_logprobs=top,
                                 response_format=response_format_dict(body.response_format))
        if fim:  # an infill also ends at the model's padding / file-separator tokens
            params.stop_token_ids = sorted(set(params.stop_token_ids) | set(fim.ends))
        jobs.append((text, ids, params))
    rid = new_id("cmpl")
    timer = RequestTimer(app.state.metrics, entry.name)
    admission = Admission(request, entry)
    streams = []
    try:
        for k, (_, ids, params) in enumerate(jobs):
            streams.append(await start_generation(entry, ids, params, f"{rid}-{k}"))
    except BaseException:
        admission.release()
        for st in streams:
            await st.aclose()
        raise
    jobs = [(text, ids, params, st) for (text, ids, params), st in zip(jobs, streams)]
    if body.stream:
        return sse_response(request, _stream(body, entry, jobs, rid, timer, admission))
    try:
        return await run_until_disconnect(request, _complete(body, entry, jobs, rid, timer),
                                          lambda: app.state.metrics.aborted.labels(entry.name).inc())
    finally:
        admission.release()


def _reason(r: str | None) -> str:
    return "length" if r == "length" else "stop"


async def _merged(entry, jobs, rid):
    """Deltas of all prompts, interleaved as they come: (prompt number, delta)."""
    if len(jobs) == 1:  # one prompt (the usual case): no pump task, no extra queue hop per token
        finished = False
        try:
            async for d in jobs[0][3]:
                yield 0, d
            finished = True
        finally:
            if not finished:  # stopped early: free the engine now, not when the stream is collected
                entry.engine.abort(f"{rid}-0")
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(k, stream):
        try:
            async for d in stream:
                await queue.put((k, d))
        except BaseException as e:
            await queue.put((k, e))
            raise
        finally:
            await queue.put((k, None))

    tasks = [asyncio.ensure_future(pump(k, job[3])) for k, job in enumerate(jobs)]
    live = len(tasks)
    try:
        while live:
            k, item = await queue.get()
            if item is None:
                live -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield k, item
    finally:
        if live:  # stopped early: cancel the pumps and free the engine at once
            for t in tasks:
                if not t.done():
                    t.cancel()
            for k in range(len(jobs)):
                entry.engine.abort(f"{rid}-{k}")


async def _complete(body, entry, jobs, rid, timer):
    n = body.n
    texts = {}
    lps = {}
    reasons = {}
    counts = {}
    prompt_total, cached = 0, 0
    seen_prompt = set()
    async for k, d in _merged(entry, jobs, rid):
        idx = k * n + d.index
        if d.token_ids:
            timer.token()
        texts.setdefault(idx, []).append(d.text)
        lps.setdefault(idx, []).extend(d.logprobs or [])
        counts[idx] = max(counts.get(idx, 0), d.completion_tokens)
        if k not in seen_prompt and d.prompt_tokens:
            seen_prompt.add(k)
            prompt_total += d.prompt_tokens
            cached += d.cached_tokens
        if d.finish_reason:
            reasons[idx] = d.finish_reason
    prompt_total = prompt_total or sum(len(job[1]) for job in jobs)
    timer.finish(prompt_total, sum(counts.values()), cached)
    choices = []
    for k, (ptext, ids, params, _) in enumerate(jobs):
        for i in range(n):
            idx = k * n + i
            text = "".join(texts.get(idx, []))
            prefix = ptext if body.echo else ""
            choices.append({
                "index": idx, "text": prefix + text, "finish_reason": _reason(reasons.get(idx)),
                "logprobs": completion_logprobs(entry.tokenizer, lps.get(idx), params.top_logprobs, len(prefix))
                if body.logprobs is not None else None,
            })
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": entry.name,
            "system_fingerprint": "jang-serve", "choices": choices,
            "usage": usage(prompt_total, sum(counts.values()), cached)}


async def _stream(body, entry, jobs, rid, timer, admission):
    created = int(time.time())
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    n = body.n
    counts: dict[int, int] = {}
    offsets: dict[int, int] = {}
    prompt_total, cached, seen = 0, 0, set()
    completed = False

    chunk = Chunks({"id": rid, "object": "text_completion", "created": created, "model": entry.name,
                    "system_fingerprint": "jang-serve"}, include_usage)

    try:
        if body.echo:
            for k, (ptext, _, _, _) in enumerate(jobs):
                for i in range(n):
                    offsets[k * n + i] = len(ptext)
                    yield chunk([{"index": k * n + i, "text": ptext, "logprobs": None, "finish_reason": None}])
        async for k, d in _merged(entry, jobs, rid):
            idx = k * n + d.index
            if d.token_ids:
                timer.token()
            counts[idx] = max(counts.get(idx, 0), d.completion_tokens)
            if k not in seen and d.prompt_tokens:
                seen.add(k)
                prompt_total += d.prompt_tokens
                cached += d.cached_tokens
            lp = None
            if body.logprobs is not None and d.logprobs:
                lp = completion_logprobs(entry.tokenizer, d.logprobs, jobs[k][2].top_logprobs, offsets.get(idx, 0))
            offsets[idx] = offsets.get(idx, 0) + len(d.text)
            if d.text or lp or d.finish_reason:
                yield chunk([{"index": idx, "text": d.text, "logprobs": lp,
                              "finish_reason": _reason(d.finish_reason) if d.finish_reason else None}])
        completed = True
        prompt_total = prompt_total or sum(len(job[1]) for job in jobs)
        timer.finish(prompt_total, sum(counts.values()), cached)
        if include_usage:
            yield chunk([], usage(prompt_total, sum(counts.values()), cached))
        yield done()
    except Exception as e:
        yield error_chunk(e)
        yield done()
    finally:
        admission.release()
        if not completed:
            timer.m.aborted.labels(entry.name).inc()
