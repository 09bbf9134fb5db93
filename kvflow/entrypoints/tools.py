"""Tool calling on /v1/chat/completions, the request side: the `tools` and `tool_choice` fields checked
(ToolsError naming the field), the JSON schema that forces a call, and the prompt the tools and the
tool-call history are rendered into.

- `tool_choice: "none"`: the model is not to call a tool, so the tools are NOT rendered into the prompt
  (OpenAI's meaning; vLLM renders them by default) and the output is not parsed for calls.
- `"auto"` (the default with tools): unconstrained output, parsed for calls (tool_parser.py).
- `"required"`: the output is generated under `required_schema`: a JSON array (one item, or 1..n with
  `parallel_tool_calls`) of `{"name": <a tool>, "arguments": {...its parameters}}`.
- `{"type": "function", "function": {"name": ...}}`: the output is that function's arguments object,
  generated under its `parameters` schema.

The chat template gets `tools=[...]` the way Hugging Face passes them. A template that does not use
`tools` (the default model's does not) gets them kvflow's way, Hermes style: a system-prompt block
listing the functions in JSON and asking for `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`.
Likewise a template that does not render `tool_calls` gets the history as text: an assistant turn's
calls as `<tool_call>` blocks, a `tool` message as a user turn holding `<tool_response>...</tool_response>`.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from kvflow.entrypoints.protocol_structured import StructuredError

NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


class ToolsError(StructuredError):
    """A tools field the API refuses (400 naming `param`)."""


@dataclass
class Tool:
    name: str
    description: str | None = None
    parameters: dict = field(default_factory=lambda: {"type": "object", "properties": {}})

    def as_openai(self) -> dict:
        fn = {"name": self.name, "parameters": self.parameters}
        if self.description is not None:
            fn["description"] = self.description
        return {"type": "function", "function": fn}


@dataclass
class ToolChoice:
    """What the request asks: mode "none", "auto", "required" or "named" (then `name`)."""
    mode: str
    name: str | None = None
    parallel: bool = True


def parse_tools(tools) -> list[Tool]:
    if not isinstance(tools, list):
        raise ToolsError("tools must be a list of tool objects", "tools")
    out: list[Tool] = []
    for i, t in enumerate(tools):
        p = f"tools[{i}]"
        if not isinstance(t, dict):
            raise ToolsError(f"{p} must be an object", p)
        if t.get("type", "function") != "function":
            raise ToolsError(f"{p}.type must be \"function\", got {t.get('type')!r}", f"{p}.type")
        fn = t.get("function")
        if not isinstance(fn, dict):
            raise ToolsError(f"{p}.function must be an object with a `name`", f"{p}.function")
        name = fn.get("name")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise ToolsError(f"{p}.function.name must be 1-64 letters, digits, _ . or -; got {name!r}",
                             f"{p}.function.name")
        if any(o.name == name for o in out):
            raise ToolsError(f"{p}.function.name: two tools are named {name!r}", f"{p}.function.name")
        desc = fn.get("description")
        if desc is not None and not isinstance(desc, str):
            raise ToolsError(f"{p}.function.description must be a string", f"{p}.function.description")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise ToolsError(f"{p}.function.parameters must be a JSON schema (an object)", f"{p}.function.parameters")
        if params.get("type", "object") != "object":
            raise ToolsError(f"{p}.function.parameters must describe an object (type \"object\")",
                             f"{p}.function.parameters")
        out.append(Tool(name, desc, params or {"type": "object", "properties": {}}))
    return out


def parse_tool_choice(choice, tools: list[Tool], parallel: bool | None) -> ToolChoice:
    parallel = True if parallel is None else bool(parallel)
    if choice is None:
        return ToolChoice("auto" if tools else "none", parallel=parallel)
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise ToolsError(f"tool_choice must be none, auto, required or a function; got {choice!r}", "tool_choice")
        if choice != "none" and not tools:
            raise ToolsError(f"tool_choice {choice!r} needs `tools`", "tool_choice")
        return ToolChoice(choice, parallel=parallel)
    if isinstance(choice, dict) and choice.get("type", "function") == "function":
        name = (choice.get("function") or {}).get("name") if isinstance(choice.get("function"), dict) else None
        if not isinstance(name, str):
            raise ToolsError("tool_choice needs function.name", "tool_choice")
        if not any(t.name == name for t in tools):
            raise ToolsError(f"tool_choice names the function {name!r}, which is not one of the tools", "tool_choice")
        return ToolChoice("named", name, parallel)
    raise ToolsError("tool_choice must be none, auto, required or {\"type\": \"function\", \"function\": "
                     "{\"name\": ...}}", "tool_choice")


def required_schema(tools: list[Tool], parallel: bool) -> dict:
    """The schema of a `required` answer: an array of calls, each one of the tools with its arguments."""
    items = {"anyOf": [{"type": "object", "properties": {"name": {"type": "string", "const": t.name},
                                                          "arguments": t.parameters},
                        "required": ["name", "arguments"], "additionalProperties": False} for t in tools]}
    schema = {"type": "array", "minItems": 1, "items": items}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def forced_schema(choice: ToolChoice, tools: list[Tool]) -> dict | None:
    """The JSON schema the output is generated under for `required` or a named function, else None."""
    if choice.mode == "required":
        return required_schema(tools, choice.parallel)
    if choice.mode == "named":
        return next(t.parameters for t in tools if t.name == choice.name)
    return None


def history_call(call, param: str) -> dict:
    """An assistant message's tool call, checked: {"id", "type": "function", "function": {"name", "arguments"}}."""
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ToolsError("a tool call needs function.name", f"{param}.function.name")
    args = fn.get("arguments", "{}")
    if not isinstance(args, (str, dict)):
        raise ToolsError("function.arguments must be a JSON string", f"{param}.function.arguments")
    out = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
    if call.get("id") is not None:
        out["id"] = str(call["id"])
    return out


# ---- the prompt -----------------------------------------------------------------------------------

def tools_block(tools: list[Tool]) -> str:
    """kvflow's (Hermes-style) system-prompt block for a template that does not render tools."""
    listing = "\n".join(json.dumps(t.as_openai(), ensure_ascii=False) for t in tools)
    return ("# Tools\n\nYou can call functions to help with the user's request. The functions are listed "
            "as JSON inside <tools></tools>:\n<tools>\n" + listing + "\n</tools>\n\n"
            "To call a function, answer with a JSON object holding its name and its arguments inside "
            "<tool_call></tool_call> tags, one block per call:\n"
            "<tool_call>\n{\"name\": \"<function name>\", \"arguments\": {<arguments as JSON>}}\n</tool_call>")


def call_text(name: str, arguments) -> str:
    """One call as a <tool_call> block (arguments as given: a JSON string, or a value)."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False) + "\n</tool_call>"


def _hermes_history(messages: list[dict]) -> list[dict]:
    """Tool calls and tool results rendered as text, for a template that does not know them."""
    out: list[dict] = []
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = "\n".join(call_text(c["function"]["name"], c["function"]["arguments"]) for c in m["tool_calls"])
            text = (m.get("content") or "").strip()
            out.append({**{k: v for k, v in m.items() if k != "tool_calls"},
                        "content": f"{text}\n{calls}" if text else calls})
        elif m["role"] == "tool":
            block = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
            prev = out[-1] if out else None
            if prev is not None and prev.get("_tool_turn"):
                prev["content"] += "\n" + block         # consecutive results share one user turn
            else:
                out.append({"role": "user", "content": block, "_tool_turn": True})
        else:
            out.append(m)
    return [{k: v for k, v in m.items() if k != "_tool_turn"} for m in out]


def _template_arguments(messages: list[dict]) -> list[dict]:
    """For templates that render tool_calls: arguments as an object (what HF templates expect)."""
    out = []
    for m in messages:
        if m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                args = c["function"]["arguments"]
                try:
                    args = json.loads(args) if isinstance(args, str) else args
                except json.JSONDecodeError:
                    pass
                calls.append({**c, "function": {**c["function"], "arguments": args}})
            m = {**m, "tool_calls": calls}
        out.append(m)
    return out


def render(messages: list[dict], tools: list[Tool], choice: ToolChoice, tokenizer) -> tuple[list[dict], list[dict] | None]:
    """The messages and the `tools` argument for the chat template: natively where the template
    renders tools / tool calls, otherwise in the Hermes form (see the module docstring)."""
    has_history = any(m.get("tool_calls") or m["role"] == "tool" for m in messages)
    if has_history:
        messages = (_template_arguments(messages) if tokenizer.template_uses("tool_calls")
                    else _hermes_history(messages))
    if not tools or choice.mode == "none":
        return messages, None
    listed = [t.as_openai() for t in tools]
    if tokenizer.template_uses("tools"):
        return messages, listed
    block = tools_block(tools)
    if messages and messages[0]["role"] == "system":
        first = messages[0]
        return [{**first, "content": f"{first.get('content') or ''}\n\n{block}".lstrip()}] + messages[1:], None
    return [{"role": "system", "content": block}] + messages, None
