"""Tool calls read from a model's output, whole or as it streams.

A `ToolCallParser` (one per choice) turns the output text so far into a `View`: the content that is
safe to show and the calls found, each with its name and the raw JSON text of its arguments so far.
The streaming path sends the View's growth as deltas; the whole-answer path takes the final View, so
the streamed deltas re-assembled give the same calls.

Modes (tools.py's ToolChoice):
- named: the whole output is the arguments object of the named function (generated under its schema).
- required: the whole output is a JSON array of `{"name": ..., "arguments": {...}}` (generated under
  tools.required_schema).
- auto: the output is free text. Calls are Hermes / Qwen `<tool_call>{"name": ..., "arguments": {...}}
  </tool_call>` blocks (any number, text around them is content), or the whole output is one plain JSON
  call object `{"name": ..., "arguments"|"parameters": {...}}` or a list of them. A block whose JSON does
  not parse, or whose name is no tool, is content. While streaming, text that may be the start of a
  `<tool_call>` is held back, and an output starting with `{` or `[` is held until it ends; a block is
  taken as a call once its name is complete and names a tool (if its JSON then breaks, the streamed
  call keeps what was sent: the one case where stream and whole answer differ).
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

OPEN, CLOSE = "<tool_call>", "</tool_call>"
ARG_KEYS = ("arguments", "parameters")
WS = " \t\n\r"


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


# ---- a JSON scanner that tolerates a truncated text ----------------------------------------------------

def _skip_ws(s: str, i: int) -> int:
    while i < len(s) and s[i] in WS:
        i += 1
    return i


def _string_end(s: str, i: int) -> int | None:
    """s[i] == '"': the index after the closing quote, or None if the string is not finished."""
    i += 1
    while i < len(s):
        c = s[i]
        if c == "\\":
            i += 2
            continue
        if c == '"':
            return i + 1
        i += 1
    return None


def _value_end(s: str, i: int) -> int | None:
    """The index after the JSON value starting at s[i], or None if it is not finished (not validated)."""
    if i >= len(s):
        return None
    if s[i] == '"':
        return _string_end(s, i)
    if s[i] in "{[":
        depth = 0
        while i < len(s):
            c = s[i]
            if c == '"':
                end = _string_end(s, i)
                if end is None:
                    return None
                i = end
                continue
            if c in "{[":
                depth += 1
            elif c in "}]":
                depth -= 1
                if depth == 0:
                    return i + 1
            i += 1
        return None
    j = i
    while j < len(s) and s[j] not in ",}] \t\n\r":
        j += 1
    return j if j < len(s) else None          # a number or literal is finished only by what follows it


@dataclass
class CallScan:
    """A call object scanned from a (maybe truncated) text: its name once complete, the raw text of its
    arguments so far, whether the arguments value and the whole object are complete, and where it ends."""
    name: str | None = None
    args: str = ""
    args_done: bool = False
    end: int | None = None
    bad: bool = False


def scan_call(s: str, i: int) -> CallScan:
    """Scan the call object starting at s[i] == '{'."""
    out = CallScan()
    i = _skip_ws(s, i + 1)
    while i < len(s):
        if s[i] == "}":
            out.end = i + 1
            return out
        if s[i] != '"':
            out.bad = True
            return out
        kend = _string_end(s, i)
        if kend is None:
            return out
        try:
            key = json.loads(s[i:kend])
        except json.JSONDecodeError:
            out.bad = True
            return out
        i = _skip_ws(s, kend)
        if i >= len(s):
            return out
        if s[i] != ":":
            out.bad = True
            return out
        i = _skip_ws(s, i + 1)
        if i >= len(s):
            return out
        vend = _value_end(s, i)
        if key == "name":
            if vend is None:
                return out
            try:
                out.name = json.loads(s[i:vend])
            except json.JSONDecodeError:
                out.bad = True
                return out
        elif key in ARG_KEYS:
            out.args = s[i:vend] if vend is not None else s[i:]
            if vend is None:
                return out
            out.args_done = True
        elif vend is None:
            return out
        i = _skip_ws(s, vend)
        if i < len(s) and s[i] == ",":
            i = _skip_ws(s, i + 1)
        elif i < len(s) and s[i] != "}":
            out.bad = True
            return out
    return out


# ---- views -------------------------------------------------------------------------------------------

@dataclass
class Call:
    name: str
    arguments: str           # raw JSON text (so far, while streaming)
    id: str = field(default_factory=new_call_id)


@dataclass
class View:
    content: str = ""
    calls: list[Call] = field(default_factory=list)


def _valid_call(obj, tools: set[str]) -> bool:
    return (isinstance(obj, dict) and obj.get("name") in tools
            and set(obj) <= {"name", *ARG_KEYS}
            and isinstance(next((obj[k] for k in ARG_KEYS if k in obj), {}), dict))


def _args_text(obj: dict) -> str:
    return json.dumps(next((obj[k] for k in ARG_KEYS if k in obj), {}), ensure_ascii=False)


def _partial_open(text: str) -> int:
    """The length of the longest suffix of text that is a proper prefix of <tool_call>."""
    for n in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-n:]):
            return n
    return 0


def _partial_close(text: str, start: int) -> int:
    """The length of the longest suffix of text[start:] that is a proper prefix of </tool_call>."""
    for n in range(min(len(CLOSE) - 1, len(text) - start), 0, -1):
        if CLOSE.startswith(text[-n:]):
            return n
    return 0


class ToolCallParser:
    """The calls in one choice's output, for one mode ("named", "required", "auto") and tool names."""

    def __init__(self, mode: str, tools: set[str], name: str | None = None):
        self.mode, self.tools, self.name = mode, tools, name
        self.ids: list[str] = []          # a call keeps its id across views

    def _calls(self, pairs: list[tuple[str, str]]) -> list[Call]:
        while len(self.ids) < len(pairs):
            self.ids.append(new_call_id())
        return [Call(n, a, self.ids[k]) for k, (n, a) in enumerate(pairs)]

    def view(self, text: str, final: bool) -> View:
        if self.mode == "named":
            return View("", self._calls([(self.name, text)]))
        if self.mode == "required":
            return self._required(text, final)
        return self._auto(text, final)

    def _required(self, text: str, final: bool) -> View:
        if final:
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                return View(text)               # cut short (length): not a call
            if not (isinstance(value, list) and value and all(_valid_call(v, self.tools) for v in value)):
                return View(text)
        pairs = []
        i = _skip_ws(text, 0)
        if i < len(text) and text[i] == "[":
            i = _skip_ws(text, i + 1)
            while i < len(text) and text[i] == "{":
                scan = scan_call(text, i)
                if scan.name is None or scan.name not in self.tools:
                    break
                pairs.append((scan.name, scan.args))
                if scan.end is None:
                    break
                i = _skip_ws(text, scan.end)
                if i < len(text) and text[i] == ",":
                    i = _skip_ws(text, i + 1)
        return View("", self._calls(pairs))

    def _auto(self, text: str, final: bool) -> View:
        stripped = text.strip()
        if stripped[:1] in ("{", "["):
            if not final:
                return View()                   # held until the output ends
            try:
                value = json.loads(stripped)
            except json.JSONDecodeError:
                value = None
            objs = value if isinstance(value, list) else [value]
            if value is not None and objs and all(_valid_call(o, self.tools) for o in objs):
                return View("", self._calls([(o["name"], _args_text(o)) for o in objs]))
            if OPEN not in text:
                return View(text)
        return self._hermes(text, final)

    def _hermes(self, text: str, final: bool) -> View:
        content, pairs, pos = [], [], 0
        while True:
            start = text.find(OPEN, pos)
            if start < 0:
                rest = text[pos:]
                content.append(rest if final else rest[:len(rest) - _partial_open(rest)])
                break
            content.append(text[pos:start])
            body = _skip_ws(text, start + len(OPEN))
            close = text.find(CLOSE, body)
            block_end = close + len(CLOSE) if close >= 0 else len(text)
            # the block's text: up to its close tag, or (streaming) short of what may start one
            inner_end = close if close >= 0 else len(text) - (0 if final else _partial_close(text, body))
            scan = scan_call(text[:inner_end], body) if body < inner_end and text[body] == "{" else None
            named = scan is not None and scan.name in self.tools
            if close >= 0 or final:              # the block is whole: a call only if its JSON parses
                inner = text[body:close if close >= 0 else len(text)].strip()
                try:
                    obj = json.loads(inner)
                except json.JSONDecodeError:
                    obj = None
                if _valid_call(obj, self.tools) and scan is not None:
                    pairs.append((obj["name"], scan.args if scan.args_done else _args_text(obj)))
                elif named and self._committed(len(pairs)):
                    pairs.append((scan.name, scan.args))      # streamed already: keep what was sent
                else:
                    content.append(text[start:block_end])
                pos = block_end
                if close < 0:
                    break
                continue
            if named:                            # still streaming this block: a call from its name on
                pairs.append((scan.name, scan.args))
            elif scan is not None and scan.bad:
                pass                             # cannot be a call: shown once the block closes
            break
        return View(_join(content), self._calls(pairs))

    def _committed(self, k: int) -> bool:
        return k < len(self.ids)


def _join(parts: list[str]) -> str:
    return "".join(parts)


def final_view(parser: ToolCallParser, text: str) -> View:
    """The whole answer's view: content outside the calls, stripped (None-worthy when empty)."""
    view = parser.view(text, final=True)
    if view.calls and parser.mode == "auto":
        view.content = view.content.strip()
    return view


class ToolCallStreamer:
    """The deltas of one choice's stream: content pieces and OpenAI `delta.tool_calls` entries."""

    def __init__(self, parser: ToolCallParser):
        self.parser = parser
        self.content_sent = 0
        self.sent: list[int] = []         # per call: characters of arguments sent

    def update(self, text: str, final: bool) -> tuple[str, list[dict]]:
        view = self.parser.view(text, final)
        content = view.content[self.content_sent:] if len(view.content) > self.content_sent else ""
        self.content_sent = max(self.content_sent, len(view.content))
        deltas = []
        for k, call in enumerate(view.calls):
            if k == len(self.sent):
                deltas.append({"index": k, "id": call.id, "type": "function",
                               "function": {"name": call.name, "arguments": ""}})
                self.sent.append(0)
            if len(call.arguments) > self.sent[k]:
                deltas.append({"index": k, "function": {"arguments": call.arguments[self.sent[k]:]}})
                self.sent[k] = len(call.arguments)
        return content, deltas

    @property
    def called(self) -> bool:
        return bool(self.sent)
