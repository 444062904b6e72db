"""Tool calls read from model output, incrementally, in the formats models are trained on:

  hermes / qwen   <tool_call>{"name": "f", "arguments": {...}}</tool_call>   (one block per call)
  llama3          {"name": "f", "parameters": {...}}   (optionally after <|python_tag|>; ';' between calls)
  mistral         [TOOL_CALLS][{"name": "f", "arguments": {...}}, ...]   or   [TOOL_CALLS]f[ARGS]{...}
  json            the whole output is one {"name", "arguments"} object (constrained tool_choice "required")
  args            the whole output is the arguments object of a known function (named tool_choice)

`ToolCallStreamer.feed(text)` returns events as text arrives: ("content", text) for ordinary text, and
("tool", index, id, name, fragment) for tool calls, where the first event of a call carries its name
and the following ones carry pieces of its JSON arguments as they are generated. Text that might start
a tool-call marker is held back until it is clear. `parse_tool_calls` runs the same machine over a
finished text, so streamed and non-streamed answers agree.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field

MARKERS = {"hermes": ("<tool_call>",), "mistral": ("[TOOL_CALLS]",), "llama3": ("<|python_tag|>", '{"name"')}
ARG_KEYS = ("arguments", "parameters")


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


class _ObjectScanner:
    """Consumes one JSON object char by char; finds the "name" string and the arguments value span."""

    def __init__(self, args_only: bool = False):
        self.text = ""
        self.depth = 0
        self.in_str = False
        self.esc = False
        self.done = False
        self.name: str | None = None
        self.args_only = args_only
        self.args_start: int | None = 0 if args_only else None
        self.args_end: int | None = None
        self._phase = "key"  # at depth 1: key -> colon -> value -> (string|nested|scalar) -> after
        self._key: str | None = None
        self._vstart = 0

    def feed(self, ch: str) -> None:
        i = len(self.text)
        self.text += ch
        if self.in_str:
            if self.esc:
                self.esc = False
            elif ch == "\\":
                self.esc = True
            elif ch == '"':
                self.in_str = False
                if self.depth == 1:
                    if self._phase == "key_str":
                        self._key = json.loads(self.text[self._vstart:i + 1])
                        self._phase = "colon"
                    elif self._phase == "string":
                        self._end_value(i + 1)
            return
        if self.depth == 1 and self._phase == "scalar" and ch in ",}":
            self._end_value(i)
        if ch == '"':
            self.in_str = True
            if self.depth == 1:
                if self._phase == "key":
                    self._phase, self._vstart = "key_str", i
                elif self._phase == "value":
                    self._start_value(i, "string")
        elif ch in "{[":
            if self.depth == 1 and self._phase == "value":
                self._start_value(i, "nested")
            self.depth += 1
        elif ch in "}]":
            self.depth -= 1
            if self.depth == 1 and self._phase == "nested":
                self._end_value(i + 1)
            elif self.depth == 0:
                if self.args_only:
                    self.args_end = i + 1
                self.done = True
        elif self.depth == 1:
            if ch == ":" and self._phase == "colon":
                self._phase = "value"
            elif ch == ",":
                self._phase, self._key = "key", None
            elif not ch.isspace() and self._phase == "value":
                self._start_value(i, "scalar")

    def _start_value(self, i: int, kind: str) -> None:
        self._phase, self._vstart = kind, i
        if self._key in ARG_KEYS and not self.args_only and self.args_start is None:
            self.args_start = i

    def _end_value(self, end: int) -> None:
        raw = self.text[self._vstart:end].strip()
        if self._key == "name" and self.name is None and raw.startswith('"'):
            self.name = json.loads(raw)
        elif self._key in ARG_KEYS and not self.args_only and self.args_end is None and self.args_start is not None:
            self.args_end = self._vstart + len(raw)
        self._phase = "after"


@dataclass
class _Call:
    index: int
    id: str
    scanner: _ObjectScanner
    name: str | None = None
    sent_name: bool = False
    sent_upto: int = 0
    fragments: list = field(default_factory=list)


class ToolCallStreamer:
    def __init__(self, parser: str = "auto", mode: str = "text", function_name: str | None = None):
        """parser: auto | hermes | llama3 | mistral | none. mode: text (free output that may contain
        calls), json (one constrained {"name", "arguments"} object), args (arguments of function_name)."""
        self.parser = parser
        self.mode = mode
        self.buf = ""
        self.emitted_any_content = False
        self.calls: list[_Call] = []
        self.format: str | None = None
        self._cur: _Call | None = None
        self._mistral_name: str | None = None
        if mode == "json":
            self.format = "json"
            self._open_call()
        elif mode == "args":
            self.format = "args"
            self._open_call(args_only=True, name=function_name)

    # ------------------------------------------------------------ public

    def feed(self, text: str) -> list[tuple]:
        self.buf += text
        return self._drain(final=False)

    def finish(self) -> list[tuple]:
        events = self._drain(final=True)
        cur = self._cur
        if cur is not None and not cur.scanner.done:
            if cur.sent_name:  # an unterminated call: flush what arguments we have
                events += self._args_events(cur, final=True)
            elif cur.scanner.text.strip():
                self.calls.remove(cur)
                events.append(("content", cur.scanner.text))
        return events

    @property
    def has_calls(self) -> bool:
        return any(c.sent_name for c in self.calls)

    # ------------------------------------------------------------ internals

    def _markers(self) -> list[tuple[str, str]]:
        kinds = ["hermes", "mistral", "llama3"] if self.parser == "auto" else [self.parser]
        return [(m, k) for k in kinds if k in MARKERS for m in MARKERS[k]]

    def _open_call(self, args_only: bool = False, name: str | None = None) -> _Call:
        call = _Call(index=len(self.calls), id=new_call_id(), scanner=_ObjectScanner(args_only), name=name)
        self.calls.append(call)
        self._cur = call
        return call

    def _drain(self, final: bool) -> list[tuple]:
        events: list[tuple] = []
        while self.buf:
            if self.format is None:
                if not self._find_marker(events, final):
                    break
            elif self._cur is not None and not self._cur.scanner.done:
                self._feed_object(events)
            else:
                if not self._between_calls(events, final):
                    break
        return events

    def _find_marker(self, events: list, final: bool) -> bool:
        """In plain text: emit content up to a tool-call marker (holding back a possible prefix)."""
        markers = [] if self.parser == "none" or self.mode != "text" else self._markers()
        best = None
        for m, kind in markers:
            if kind == "llama3" and m.startswith("{"):
                # bare JSON counts only when it opens the answer
                if self.emitted_any_content and self.buf.strip():
                    continue
                pos = len(self.buf) - len(self.buf.lstrip())
                if not self.buf[pos:].startswith(m):
                    continue
            else:
                pos = self.buf.find(m)
                if pos < 0:
                    continue
            if best is None or pos < best[0]:
                best = (pos, m, kind)
        if best is None:
            hold = 0 if final else self._possible_prefix(markers)
            out = self.buf[:len(self.buf) - hold]
            if out:
                self._content(events, out)
            self.buf = self.buf[len(out):]
            return False
        pos, marker, kind = best
        if pos:
            self._content(events, self.buf[:pos])
        self.format = kind
        self.buf = self.buf[pos:] if marker.startswith("{") else self.buf[pos + len(marker):]
        return True

    def _possible_prefix(self, markers) -> int:
        """Length of the longest buffer suffix that could grow into a marker."""
        hold = 0
        for m, kind in markers:
            if kind == "llama3" and m.startswith("{"):
                if not self.emitted_any_content and m.startswith(self.buf.lstrip()):
                    hold = max(hold, len(self.buf))
                continue
            for k in range(min(len(m) - 1, len(self.buf)), 0, -1):
                if self.buf.endswith(m[:k]):
                    hold = max(hold, k)
                    break
        return hold

    def _content(self, events: list, text: str) -> None:
        if text.strip():
            self.emitted_any_content = True
        events.append(("content", text))

    def _between_calls(self, events: list, final: bool) -> bool:
        """After a call (or right after a marker): skip delimiters, open the next call."""
        s = self.buf
        if self.format == "mistral" and self._mistral_name is None:
            stripped = s.lstrip()
            if stripped and stripped[0] not in "[{,]":
                head, sep, rest = stripped.partition("[ARGS]")
                if not sep:
                    if final:
                        self.buf = ""
                    return False
                self._open_call(args_only=True, name=head.strip())
                self.buf = rest
                return True
        i = 0
        while i < len(s) and (s[i].isspace() or s[i] in ",;[]"):
            i += 1
        closers = ("</tool_call>", "<tool_call>", "<|python_tag|>", "[TOOL_CALLS]", "<|eom_id|>")
        for closer in closers:
            if s.startswith(closer, i):
                self.buf = s[i + len(closer):]
                return True
        rest = s[i:]
        if not rest:
            self.buf = ""
            return False
        if rest[0] == "{" and self.format != "args":
            self.buf = rest
            self._open_call()
            return True
        if not final and any(c.startswith(rest) for c in closers):
            self.buf = rest
            return False
        # trailing text after the calls: keep it as content
        self._content(events, s[i:])
        self.buf = ""
        return False

    def _feed_object(self, events: list) -> None:
        cur = self._cur
        sc = cur.scanner
        consumed = 0
        for ch in self.buf:
            if sc.done:
                break
            if not sc.text and ch.isspace():
                consumed += 1
                continue
            sc.feed(ch)
            consumed += 1
        self.buf = self.buf[consumed:]
        if cur.name is None and sc.name is not None:
            cur.name = sc.name
        if cur.name is not None and not cur.sent_name:
            cur.sent_name = True
            events.append(("tool", cur.index, cur.id, cur.name, ""))
        if cur.sent_name:
            events += self._args_events(cur, final=sc.done)
        if sc.done and not cur.sent_name:  # an object without a name is not a call
            self.calls.remove(cur)
            self._content(events, sc.text)
        if sc.done:
            self._cur = None

    def _args_events(self, cur: _Call, final: bool) -> list[tuple]:
        sc = cur.scanner
        if sc.args_start is None:
            if final and not cur.fragments:
                cur.fragments.append("{}")
                return [("tool", cur.index, cur.id, None, "{}")]
            return []
        text = sc.text
        if text[sc.args_start] == '"':  # arguments given as a JSON string: send it decoded, at the end
            if sc.args_end is None:
                return []
            try:
                frag = json.loads(text[sc.args_start:sc.args_end])
            except ValueError:
                frag = text[sc.args_start:sc.args_end]
            sc.args_start = sc.args_end
            cur.fragments.append(frag)
            return [("tool", cur.index, cur.id, None, frag)]
        start = max(sc.args_start, cur.sent_upto)
        end = sc.args_end if sc.args_end is not None else len(text)
        if end <= start:
            return []
        frag = text[start:end]
        cur.sent_upto = end
        cur.fragments.append(frag)
        return [("tool", cur.index, cur.id, None, frag)]


@dataclass
class ParsedCall:
    id: str
    name: str
    arguments: str

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def collect(events: list[tuple], content: list[str], calls: dict[int, ParsedCall]) -> None:
    """Fold streamer events into content text and whole calls."""
    for ev in events:
        if ev[0] == "content":
            content.append(ev[1])
        else:
            _, index, cid, name, frag = ev
            call = calls.setdefault(index, ParsedCall(cid, name or "", ""))
            if name:
                call.name = name
            call.arguments += frag


def parse_tool_calls(text: str, parser: str = "auto", mode: str = "text",
                     function_name: str | None = None) -> tuple[str | None, list[ParsedCall]]:
    """(content, calls) of a finished output; content is None when only calls were produced."""
    st = ToolCallStreamer(parser, mode, function_name)
    content: list[str] = []
    calls: dict[int, ParsedCall] = {}
    collect(st.feed(text) + st.finish(), content, calls)
    body = "".join(content)
    out = [calls[i] for i in sorted(calls)]
    if out and not body.strip():
        return None, out
    return body, out


def constrained_schema(tools: list[dict], tool_choice) -> tuple[dict, str, str | None]:
    """(json schema, streamer mode, function name) that forces a valid call for required/named choice."""
    if isinstance(tool_choice, dict):
        name = tool_choice["function"]["name"]
        fn = next(t["function"] for t in tools if t["function"]["name"] == name)
        return _params(fn), "args", name
    options = []
    for t in tools:
        fn = t["function"]
        options.append({"type": "object", "properties": {"name": {"const": fn["name"]}, "arguments": _params(fn)},
                        "required": ["name", "arguments"], "additionalProperties": False})
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    return schema, "json", None


def _params(fn: dict) -> dict:
    p = fn.get("parameters") or {"type": "object", "properties": {}}
    return p
