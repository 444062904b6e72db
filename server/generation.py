"""What the routes share: request -> SamplingParams, context-length checks, admission (queue
limits), running a request on the engine with abort on cancel, and logprob formatting."""

from __future__ import annotations

import asyncio
import uuid
from typing import AsyncIterator

from fastapi import Request

from .errors import APIError, bad_request
from .registry import ModelEntry


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def resolve_max_tokens(entry: ModelEntry, prompt_len: int, requested: int | None, what: str = "messages") -> int:
    """max_tokens to use, or 400 context_length_exceeded with both numbers."""
    ctx = entry.context_length
    if prompt_len >= ctx or (requested is not None and prompt_len + requested > ctx):
        total = prompt_len + (requested or 0)
        detail = (f"However, you requested {total} tokens ({prompt_len} in the {what}, {requested} in the "
                  f"completion)." if requested is not None else
                  f"However, your {what} resulted in {prompt_len} tokens.")
        raise APIError(400, f"This model's maximum context length is {ctx} tokens. {detail} "
                            "Please reduce the length of the prompt or of max_tokens.",
                       param="messages" if what == "messages" else "prompt", code="context_length_exceeded")
    return requested if requested is not None else ctx - prompt_len


def sampling_params(req, entry: ModelEntry, max_tokens: int, *, logprobs: bool = False, top_logprobs: int = 0,
                    response_format: dict | None = None, n: int | None = None):
    from jang_serve.engine.sampling_params import SamplingParams

    vocab = getattr(entry.tokenizer, "vocab_size", None)
    bias = {}
    for k, v in (req.logit_bias or {}).items():
        tid = int(k)
        if vocab is not None and tid >= vocab:
            raise bad_request(f"logit_bias token id {tid} is outside the vocabulary (size {vocab})",
                              param="logit_bias")
        bias[tid] = v
    for tid in req.stop_token_ids or []:
        if tid < 0 or (vocab is not None and tid >= vocab):
            raise bad_request(f"stop_token_ids: {tid} is not a token id of this model", param="stop_token_ids")
    defaults = entry.sampling["values"]

    def pick(name):  # the request's value, else the model's default (generation_config.json), else OpenAI's
        v = getattr(req, name, None)
        return defaults[name] if v is None else v

    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=pick("temperature"),
            top_p=pick("top_p"),
            top_k=pick("top_k"),
            min_p=pick("min_p"),
            repetition_penalty=pick("repetition_penalty"),
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            logit_bias=bias,
            seed=req.seed,
            n=n or req.n,
            stop=list(req.stop or []),
            stop_token_ids=list(req.stop_token_ids or []),
            logprobs=logprobs,
            top_logprobs=top_logprobs,
            response_format=response_format,
            ignore_eos=req.ignore_eos,
        )
    except ValueError as e:
        raise bad_request(str(e)) from None


def response_format_dict(rf) -> dict | None:
    if rf is None or rf.type == "text":
        return None
    if rf.type == "json_object":
        return {"type": "json_object"}
    js = rf.json_schema
    return {"type": "json_schema", "json_schema": {"name": js.name, "schema": js.schema_, "strict": js.strict}}


class Admission:
    """Counts a request against its model's queue limit for as long as it runs."""

    def __init__(self, request: Request, entry: ModelEntry):
        cfg = request.app.state.config
        limit = cfg.max_num_seqs + cfg.max_queue
        if entry.active >= limit:
            raise APIError(429, f"The server is busy: {entry.active} requests are running or waiting for "
                                f"{entry.name!r} (limit {limit}). Retry shortly.",
                           code="queue_full", headers={"Retry-After": "1"})
        self.entry = entry
        entry.active += 1
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.entry.active -= 1


async def start_generation(entry: ModelEntry, prompt_ids: list[int], params, request_id: str) -> AsyncIterator:
    """Submit a request to the engine and return its deltas as an async iterator.

    The engine validates a request (prompt length, token ids, response_format schema) when its
    stream is first advanced; that happens here, before any response is sent, so a bad request
    is a 400 even when streaming. The request is aborted if the consumer stops early.
    """
    agen = entry.engine.generate(prompt_ids, params, request_id)
    first = asyncio.ensure_future(agen.__anext__())
    for _ in range(3):  # let the synchronous validation part of the first step run
        if first.done():
            break
        await asyncio.sleep(0)
    if first.done() and not first.cancelled() and first.exception() is not None:
        exc = first.exception()
        if isinstance(exc, StopAsyncIteration):
            return _empty()
        if isinstance(exc, ValueError):
            raise bad_request(str(exc)) from None
        raise exc
    return _deltas(entry, agen, first, request_id)


async def _empty():
    return
    yield


async def _deltas(entry: ModelEntry, agen, first, request_id: str):
    finished = False
    try:
        try:
            delta = await first
        except StopAsyncIteration:
            finished = True
            return
        yield delta
        async for delta in agen:
            yield delta
        finished = True
    finally:
        if not finished:
            if not first.done():
                first.cancel()
            entry.engine.abort(request_id)


async def run_until_disconnect(request: Request, coro, on_disconnect) -> object:
    """Await `coro`, cancelling it (and calling on_disconnect) as soon as the client goes away."""
    task = asyncio.ensure_future(coro)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.2)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                on_disconnect()
                try:
                    await task
                except BaseException:
                    pass
                raise asyncio.CancelledError("client disconnected")
    finally:
        if not task.done():
            task.cancel()


# ---------------------------------------------------------------- logprobs


def _tok(tokenizer, tid: int) -> tuple[str, list[int]]:
    b = tokenizer.token_bytes(tid, skip_special_tokens=False) if hasattr(tokenizer, "token_bytes") \
        else tokenizer.decode([tid]).encode("utf-8")
    return b.decode("utf-8", errors="replace"), list(b)


def chat_logprobs(tokenizer, items, top_n: int) -> list[dict]:
    out = []
    for lp in items or []:
        text, raw = _tok(tokenizer, lp.token_id)
        top = []
        for tid, val in (lp.top or [])[:top_n]:
            t, b = _tok(tokenizer, tid)
            top.append({"token": t, "logprob": float(val), "bytes": b})
        out.append({"token": text, "logprob": float(lp.logprob), "bytes": raw, "top_logprobs": top})
    return out


def completion_logprobs(tokenizer, items, top_n: int, offset: int) -> dict:
    tokens, token_lps, tops, offsets = [], [], [], []
    for lp in items or []:
        text, _ = _tok(tokenizer, lp.token_id)
        tokens.append(text)
        token_lps.append(float(lp.logprob))
        tops.append({_tok(tokenizer, t)[0]: float(v) for t, v in (lp.top or [])[:top_n]} if top_n else None)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}
