"""POST /v1/chat/completions: chat template -> engine -> message (or chat.completion.chunk stream),
with tool calls parsed from the output (or forced by constrained decoding for tool_choice
"required" / a named function)."""

from __future__ import annotations

import json
import time

from fastapi import APIRouter, Depends, Request

from ..auth import require_api_key
from ..errors import bad_request
from ..generation import (Admission, chat_logprobs, new_id, start_generation, resolve_max_tokens, response_format_dict,
                          run_until_disconnect, sampling_params, usage)
from ..metrics import RequestTimer
from ..schemas import ChatCompletionRequest, NamedToolChoice, text_of
from ..streaming import Chunks, done, error_chunk, sse_response
from ..tool_calls import ToolCallStreamer, collect, constrained_schema

router = APIRouter()
FINGERPRINT = "jang-serve"

_TOOL_PROMPT = (
    "You can call functions. To call one, reply with only\n"
    "<tool_call>\n{\"name\": <function name>, \"arguments\": <arguments as a JSON object>}\n</tool_call>\n"
    "The available functions:\n<tools>\n%s\n</tools>"
)


def render_messages(req: ChatCompletionRequest) -> list[dict]:
    out = []
    for i, m in enumerate(req.messages):
        try:
            content = text_of(m.content)
        except ValueError as e:
            raise bad_request(str(e), param=f"messages[{i}].content") from None
        d: dict = {"role": "system" if m.role == "developer" else m.role, "content": content}
        if m.tool_calls:
            calls = []
            for c in m.tool_calls:
                try:
                    args = json.loads(c.function.arguments or "{}")
                except ValueError:
                    args = c.function.arguments
                calls.append({"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": args}})
            d["tool_calls"] = calls
        if m.tool_call_id:
            d["tool_call_id"] = m.tool_call_id
        if m.name:
            d["name"] = m.name
        out.append(d)
    return out


def build_prompt(req: ChatCompletionRequest, tokenizer, tools: list[dict] | None) -> str:
    messages = render_messages(req)
    template = getattr(tokenizer, "chat_template", None) or ""
    if tools and "tools" not in template:
        # the model's template cannot show tools: describe them in the system message instead
        desc = _TOOL_PROMPT % "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        if messages and messages[0]["role"] == "system":
            messages[0] = dict(messages[0], content=messages[0]["content"] + "\n\n" + desc)
        else:
            messages.insert(0, {"role": "system", "content": desc})
        tools = None
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=req.add_generation_prompt,
                                             **(req.chat_template_kwargs or {}))
    except Exception as e:  # template errors (e.g. raise_exception on bad role order) are the request's fault
        raise bad_request(f"The chat template rejected these messages: {type(e).__name__}: {e}",
                          param="messages", code="invalid_messages") from None


@router.post("/v1/chat/completions", dependencies=[Depends(require_api_key)])
async def chat_completions(body: ChatCompletionRequest, request: Request):
    app = request.app
    entry = app.state.models.get(body.model)
    tok = entry.tokenizer
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
    tools_on = bool(tools) and body.tool_choice != "none"
    mode, fn_name = "text", None
    rf = response_format_dict(body.response_format)
    if tools_on and (body.tool_choice == "required" or isinstance(body.tool_choice, NamedToolChoice)):
        choice = body.tool_choice.model_dump() if isinstance(body.tool_choice, NamedToolChoice) else "required"
        schema, mode, fn_name = constrained_schema(tools, choice)
        rf = {"type": "json_schema", "json_schema": {"name": "tool_call", "schema": schema, "strict": True}}
    prompt = build_prompt(body, tok, tools if tools_on else None)
    ids = tok.encode(prompt, add_special_tokens=False)
    requested = body.max_completion_tokens or body.max_tokens
    max_tokens = resolve_max_tokens(entry, len(ids), requested, "messages")
    params = sampling_params(body, entry, max_tokens, logprobs=body.logprobs, top_logprobs=body.top_logprobs or 0,
                             response_format=rf)
    parser = app.state.config.tool_call_parser if tools_on else "none"
    make_streamer = (lambda: ToolCallStreamer(parser, mode, fn_name))
    rid = new_id("chatcmpl")
    timer = RequestTimer(app.state.metrics, entry.name)
    admission = Admission(request, entry)
    try:
        deltas = await start_generation(entry, ids, params, rid)
    except BaseException:
        admission.release()
        raise
    ctx = dict(entry=entry, ids=ids, params=params, rid=rid, make_streamer=make_streamer, timer=timer,
               admission=admission, deltas=deltas)
    if body.stream:
        return sse_response(request, _stream(body, **ctx))
    try:
        return await run_until_disconnect(request, _complete(body, **ctx),
                                          lambda: app.state.metrics.aborted.labels(entry.name).inc())
    finally:
        ctx["admission"].release()


def _finish_reason(engine_reason: str | None, has_calls: bool) -> str:
    if has_calls:
        return "tool_calls"
    return {"length": "length"}.get(engine_reason or "", "stop")


async def _complete(body, *, entry, ids, params, rid, make_streamer, timer, admission, deltas):
    n = params.n
    streamers = [make_streamer() for _ in range(n)]
    content = [[] for _ in range(n)]
    calls = [dict() for _ in range(n)]
    lps = [[] for _ in range(n)]
    reasons = [None] * n
    counts = [0] * n
    prompt_tokens, cached = len(ids), 0
    async for d in deltas:
        if d.token_ids:
            timer.token()
        i = d.index
        collect(streamers[i].feed(d.text), content[i], calls[i])
        if d.logprobs:
            lps[i].extend(d.logprobs)
        counts[i] = max(counts[i], d.completion_tokens)
        prompt_tokens = d.prompt_tokens or prompt_tokens
        cached = max(cached, d.cached_tokens)
        if d.finish_reason:
            collect(streamers[i].finish(), content[i], calls[i])
            reasons[i] = d.finish_reason
    timer.finish(prompt_tokens, sum(counts), cached)
    choices = []
    for i in range(n):
        text = "".join(content[i])
        tool_calls = [calls[i][k].to_openai() for k in sorted(calls[i])]
        msg = {"role": "assistant", "content": None if (tool_calls and not text.strip()) else text, "refusal": None}
        if tool_calls:
            msg["tool_calls"] = tool_calls
        choices.append({"index": i, "message": msg, "finish_reason": _finish_reason(reasons[i], bool(tool_calls)),
                        "logprobs": {"content": chat_logprobs(entry.tokenizer, lps[i], params.top_logprobs)}
                        if body.logprobs else None})
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": entry.name,
            "system_fingerprint": FINGERPRINT, "choices": choices,
            "usage": usage(prompt_tokens, sum(counts), cached)}


async def _stream(body, *, entry, ids, params, rid, make_streamer, timer, admission, deltas):
    created = int(time.time())
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    n = params.n

    chunk = Chunks({"id": rid, "object": "chat.completion.chunk", "created": created, "model": entry.name,
                    "system_fingerprint": FINGERPRINT}, include_usage)

    def choice(i, delta, finish=None, logprobs=None):
        return {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}

    streamers = [make_streamer() for _ in range(n)]
    counts = [0] * n
    prompt_tokens, cached = len(ids), 0
    completed = False
    try:
        for i in range(n):
            yield chunk([choice(i, {"role": "assistant", "content": ""})])
        async for d in deltas:
            if d.token_ids:
                timer.token()
            i = d.index
            counts[i] = max(counts[i], d.completion_tokens)
            prompt_tokens = d.prompt_tokens or prompt_tokens
            cached = max(cached, d.cached_tokens)
            events = streamers[i].feed(d.text)
            if d.finish_reason:
                events += streamers[i].finish()
            lp = ({"content": chat_logprobs(entry.tokenizer, d.logprobs, params.top_logprobs)}
                  if body.logprobs and d.logprobs else None)
            for delta in _deltas(events):
                yield chunk([choice(i, delta, logprobs=lp)])
                lp = None
            if lp is not None:
                yield chunk([choice(i, {"content": ""}, logprobs=lp)])
            if d.finish_reason:
                yield chunk([choice(i, {}, _finish_reason(d.finish_reason, streamers[i].has_calls))])
        completed = True
        timer.finish(prompt_tokens, sum(counts), cached)
        if include_usage:
            yield chunk([], usage(prompt_tokens, sum(counts), cached))
        yield done()
    except Exception as e:
        yield error_chunk(e)
        yield done()
    finally:
        admission.release()
        if not completed:  # the client went away (or generation failed): free the engine at once
            entry.engine.abort(rid)
            timer.m.aborted.labels(entry.name).inc()


def _deltas(events: list[tuple]) -> list[dict]:
    """Streamer events -> chat deltas: runs of content merge; each tool fragment is its own delta."""
    out: list[dict] = []
    for ev in events:
        if ev[0] == "content":
            if not ev[1]:
                continue
            if out and "content" in out[-1] and "tool_calls" not in out[-1]:
                out[-1]["content"] += ev[1]
            else:
                out.append({"content": ev[1]})
        else:
            _, index, cid, name, frag = ev
            fn = {"arguments": frag}
            call = {"index": index, "id": cid, "function": fn}
            if name:
                fn["name"] = name
                call["type"] = "function"
            out.append({"tool_calls": [call]})
    return out
