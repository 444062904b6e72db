"""POST /v1/responses (basic): text or messages in, one output_text message out, streamed as the
Responses API's typed events or returned whole. No tools, no stored conversation state."""

from __future__ import annotations

import time
from types import SimpleNamespace

from fastapi import APIRouter, Depends, Request

from ..auth import require_api_key
from ..errors import bad_request
from ..generation import (Admission, new_id, resolve_max_tokens, run_until_disconnect, sampling_params,
                          start_generation)
from ..metrics import RequestTimer
from ..schemas import ResponsesRequest, text_of
from ..streaming import error_chunk, event, sse_response

router = APIRouter()


def _messages(body: ResponsesRequest) -> list[dict]:
    msgs = [{"role": "system", "content": body.instructions}] if body.instructions else []
    if isinstance(body.input, str):
        return msgs + [{"role": "user", "content": body.input}]
    for i, item in enumerate(body.input):
        try:
            msgs.append({"role": "system" if item.role == "developer" else item.role, "content": text_of(item.content)})
        except ValueError as e:
            raise bad_request(str(e), param=f"input[{i}].content") from None
    return msgs


def _params_source(body: ResponsesRequest):
    return SimpleNamespace(logit_bias=None, stop_token_ids=None, temperature=body.temperature, top_p=body.top_p,
                           top_k=None, min_p=None, repetition_penalty=None, presence_penalty=None,
                           frequency_penalty=None, seed=body.seed, n=1, stop=[], ignore_eos=False)


def _usage(prompt: int, out: int, cached: int) -> dict:
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached}, "output_tokens": out,
            "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": prompt + out}


def _response(rid, body, entry, created, status, output, usage_=None, incomplete=None) -> dict:
    return {"id": rid, "object": "response", "created_at": created, "status": status, "error": None,
            "incomplete_details": incomplete, "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens, "model": entry.name, "output": output,
            "parallel_tool_calls": False, "temperature": body.temperature, "top_p": body.top_p,
            "tool_choice": "auto", "tools": [], "text": {"format": {"type": "text"}}, "usage": usage_}


def _message(item_id: str, text: str, status: str) -> dict:
    content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if status else []
    return {"id": item_id, "type": "message", "status": status or "in_progress", "role": "assistant",
            "content": content}


@router.post("/v1/responses", dependencies=[Depends(require_api_key)])
async def responses(body: ResponsesRequest, request: Request):
    app = request.app
    entry = app.state.models.get(body.model)
    tok = entry.tokenizer
    try:
        prompt = tok.apply_chat_template(_messages(body), add_generation_prompt=True)
    except Exception as e:  # the template refused these messages
        raise bad_request(f"The chat template rejected this input: {type(e).__name__}: {e}", param="input") from None
    ids = tok.encode(prompt, add_special_tokens=False)
    max_tokens = resolve_max_tokens(entry, len(ids), body.max_output_tokens, "input")
    params = sampling_params(_params_source(body), entry, max_tokens)
    rid, item_id = new_id("resp"), new_id("msg")
    timer = RequestTimer(app.state.metrics, entry.name)
    admission = Admission(request, entry)
    try:
        deltas = await start_generation(entry, ids, params, rid)
    except BaseException:
        admission.release()
        raise
    if body.stream:
        return sse_response(request, _stream(body, entry, ids, deltas, rid, item_id, timer, admission))
    try:
        return await run_until_disconnect(request, _complete(body, entry, ids, deltas, rid, item_id, timer),
                                          lambda: app.state.metrics.aborted.labels(entry.name).inc())
    finally:
        admission.release()


async def _complete(body, entry, ids, deltas, rid, item_id, timer):
    created = int(time.time())
    parts, reason, count, cached, prompt = [], None, 0, 0, len(ids)
    async for d in deltas:
        if d.token_ids:
            timer.token()
        parts.append(d.text)
        count, cached = max(count, d.completion_tokens), max(cached, d.cached_tokens)
        prompt = d.prompt_tokens or prompt
        reason = d.finish_reason or reason
    timer.finish(prompt, count, cached)
    incomplete = {"reason": "max_output_tokens"} if reason == "length" else None
    return _response(rid, body, entry, created, "incomplete" if incomplete else "completed",
                     [_message(item_id, "".join(parts), "completed")], _usage(prompt, count, cached), incomplete)


async def _stream(body, entry, ids, deltas, rid, item_id, timer, admission):
    created = int(time.time())
    seq = [0]

    def ev(kind: str, **payload):
        seq[0] += 1
        return event(kind, {"type": kind, "sequence_number": seq[0] - 1, **payload})

    parts, reason, count, cached, prompt = [], None, 0, 0, len(ids)
    loc = {"item_id": item_id, "output_index": 0, "content_index": 0}
    completed = False
    try:
        yield ev("response.created", response=_response(rid, body, entry, created, "in_progress", []))
        yield ev("response.in_progress", response=_response(rid, body, entry, created, "in_progress", []))
        yield ev("response.output_item.added", output_index=0, item=_message(item_id, "", ""))
        yield ev("response.content_part.added", **loc,
                 part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})
        async for d in deltas:
            if d.token_ids:
                timer.token()
            count, cached = max(count, d.completion_tokens), max(cached, d.cached_tokens)
            prompt = d.prompt_tokens or prompt
            reason = d.finish_reason or reason
            if d.text:
                parts.append(d.text)
                yield ev("response.output_text.delta", **loc, delta=d.text, logprobs=[])
        completed = True
        timer.finish(prompt, count, cached)
        text = "".join(parts)
        yield ev("response.output_text.done", **loc, text=text, logprobs=[])
        yield ev("response.content_part.done", **loc,
                 part={"type": "output_text", "text": text, "annotations": [], "logprobs": []})
        item = _message(item_id, text, "completed")
        yield ev("response.output_item.done", output_index=0, item=item)
        incomplete = {"reason": "max_output_tokens"} if reason == "length" else None
        final = _response(rid, body, entry, created, "incomplete" if incomplete else "completed", [item],
                          _usage(prompt, count, cached), incomplete)
        yield ev("response.incomplete" if incomplete else "response.completed", response=final)
    except Exception as e:
        yield error_chunk(e)
    finally:
        admission.release()
        if not completed:
            entry.engine.abort(rid)
            timer.m.aborted.labels(entry.name).inc()
