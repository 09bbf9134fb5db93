"""The OpenAI-compatible request bodies (pydantic) and the SamplingParams they ask for; the response
bodies are built in responses.py.

Fields follow OpenAI's API, plus vLLM's extra sampling fields (top_k, min_p, repetition_penalty,
ignore_eos, min_tokens, stop_token_ids, skip_special_tokens, include_stop_str_in_output).
OpenAI fields kvflow cannot honour are decided one by one, as vLLM does (issue 19, item 8): where
ignoring one is harmless (the client still gets what it asked for) it is accepted and a warning is
logged once per field per process (`ignored`); where the client would expect something else (tools,
web search, audio) the request is refused with a 400 naming the field. Unknown fields are ignored with
the same once-per-field warning.
"""
from __future__ import annotations

import logging

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kvflow.sampling.params import SamplingParams

logger = logging.getLogger("kvflow")

MAX_N = 128
TOOLS_UNSUPPORTED = "tool calling is not supported yet"
_warned: set[str] = set()


def ignored(field: str, why: str = "kvflow does not use it") -> None:
    """Log, once per field per process, that a request's field was accepted and ignored."""
    if field not in _warned:
        _warned.add(field)
        logger.warning("the request field `%s` is accepted and ignored: %s (logged once)", field, why)


class ProtocolError(ValueError):
    """A request the API refuses: an HTTP status, a message, and the parameter at fault."""

    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param


def lone_surrogate(value) -> str | None:
    """The path of the first string in a parsed JSON value that holds a lone surrogate (JSON can carry
    "\\ud800", UTF-8 and the tokenizer cannot), or None. Iterative: any nesting depth is fine."""
    stack = [(value, "")]
    while stack:
        v, path = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return path or "body"
        elif isinstance(v, dict):
            for k, item in v.items():
                stack += [(item, f"{path}.{k}" if path else str(k)), (k, path or "body")]
        elif isinstance(v, list):
            stack += [(item, f"{path}[{i}]") for i, item in enumerate(v)]
    return None


class _Body(BaseModel):
    """A request body: unknown fields are ignored (a warning once per field: `warn_unknown`), and text
    must be valid Unicode (no lone surrogates)."""
    model_config = ConfigDict(extra="allow")

    def warn_unknown(self) -> None:
        for name in self.model_extra or ():
            ignored(name, "it is not a field kvflow knows")

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data):
        path = lone_surrogate(data)
        if path is not None:
            raise ValueError(f"{path} holds a lone surrogate (such as \\ud800): it is not valid Unicode text")
        return data


class StreamOptions(BaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _SamplingRequest(_Body):
    """Fields that both endpoints share."""

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's extra fields
    priority: int = 0                  # lower runs first under --scheduling-policy priority
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def _sampling_params(self, max_tokens: int | None, logprobs: int | None,
                         prompt_logprobs: int | None = None) -> SamplingParams:
        self.warn_unknown()
        if self.n > MAX_N:
            raise ProtocolError(f"n must be <= {MAX_N}, got {self.n}", param="n")
        if self.stream_options is not None and not self.stream:
            raise ProtocolError("stream_options is only allowed when stream is true", param="stream_options")
        kw = dict(n=self.n, presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                  seed=self.seed, stop=self.stop, stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos,
                  max_tokens=max_tokens, min_tokens=self.min_tokens, logprobs=logprobs,
                  skip_special_tokens=self.skip_special_tokens, logit_bias=self.logit_bias,
                  include_stop_str_in_output=self.include_stop_str_in_output, prompt_logprobs=prompt_logprobs)
        for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
            if getattr(self, name) is not None:
                kw[name] = getattr(self, name)
        try:
            return SamplingParams(**kw)
        except ValueError as e:
            raise ProtocolError(str(e), param=str(e).split(" ", 1)[0]) from None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def sampling_params(self) -> SamplingParams:
        if self.best_of is not None and self.best_of != self.n:
            raise ProtocolError("best_of is not supported (only best_of == n)", param="best_of")
        if self.suffix:
            raise ProtocolError("suffix is not supported", param="suffix")
        # echo with logprobs also scores the prompt (the first prompt token has none)
        return self._sampling_params(self.max_tokens, self.logprobs,
                                     self.logprobs if self.echo and self.logprobs is not None else None)

    def prompts(self) -> list[str | list[int]]:
        """The prompt(s): strings or token-id lists (a batch gives choices prompt_index * n + i)."""
        p = self.prompt
        if isinstance(p, str) or (p and all(isinstance(t, int) for t in p)):
            p = [p]
        if not p:
            raise ProtocolError("prompt must not be empty", param="prompt")
        return list(p)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    """One chat message. Tool-call history (an assistant's `tool_calls` or `function_call`, a `tool` or
    `function` message) is refused, not dropped: without the tool definitions (refused too) the chat
    template cannot render it faithfully, and dropping it would change the conversation."""
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list | None = None
    function_call: dict | None = None

    def as_template_message(self, param: str = "messages") -> dict:
        if self.role in ("tool", "function"):
            raise ProtocolError(f"`{self.role}` messages: {TOOLS_UNSUPPORTED}", param=f"{param}.role")
        for field in ("tool_calls", "function_call"):
            if getattr(self, field):
                raise ProtocolError(f"{field} in a message: {TOOLS_UNSUPPORTED}", param=f"{param}.{field}")
        content = self.content
        if isinstance(content, list):
            if any(p.type != "text" for p in content):
                raise ProtocolError("only text content parts are supported", param=param)
            content = "".join(p.text or "" for p in content)
        message = {"role": self.role, "content": content or ""}
        if self.name is not None:
            message["name"] = self.name          # for the templates that render it
        return message


def template_messages(messages: list[ChatMessage]) -> list[dict]:
    return [m.as_template_message(f"messages[{i}]") for i, m in enumerate(messages)]


# Chat fields kvflow cannot honour, decided per field (issue 19, item 8). Harmless to ignore, as vLLM
# does: the answer is still the one the client asked for (a hint it cannot use, bookkeeping).
CHAT_IGNORED = {
    "parallel_tool_calls": "it only matters with tools, which are refused",
    "reasoning_effort": "the model has no reasoning budget to set",
    "prediction": "predicted outputs only make a completion faster, never different",
    "store": "kvflow stores no completions", "metadata": "kvflow stores no completions",
    "service_tier": "kvflow has one tier", "verbosity": "the model has no verbosity control",
}
# Refused: the client would expect something kvflow does not do.
CHAT_REFUSED = {
    "web_search_options": "web search is not supported",
    "audio": "audio output is not supported",
    "functions": TOOLS_UNSUPPORTED,
}


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    response_format: dict | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None
    function_call: str | dict | None = None
    modalities: list[str] | None = None

    def sampling_params(self) -> SamplingParams:
        self.check_fields()
        if self.response_format is not None and self.response_format.get("type", "text") != "text":
            raise ProtocolError("response_format other than text is not supported yet", param="response_format")
        if self.top_logprobs is not None and not self.logprobs:
            raise ProtocolError("top_logprobs needs logprobs set to true", param="top_logprobs")
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return self._sampling_params(max_tokens, (self.top_logprobs or 0) if self.logprobs else None)

    def check_fields(self) -> None:
        """Refuse the fields that ask for what kvflow does not do; warn once about those it ignores."""
        if self.tools:
            raise ProtocolError(f"tools: {TOOLS_UNSUPPORTED}", param="tools")
        for field in ("tool_choice", "function_call"):      # "none" and "auto" ask for no tool call
            if getattr(self, field) not in (None, "none", "auto"):
                raise ProtocolError(f"{field}: {TOOLS_UNSUPPORTED}", param=field)
        if self.modalities is not None and set(self.modalities) - {"text"}:
            raise ProtocolError("only the text modality is supported", param="modalities")
        extra = self.model_extra or {}
        for field, why in CHAT_REFUSED.items():
            if extra.pop(field, None) not in (None, []):        # {} still asks for web search
                raise ProtocolError(f"{field}: {why}", param=field)
        for field, why in CHAT_IGNORED.items():
            if extra.pop(field, None) not in (None, False):     # false asks for nothing
                ignored(field, why)

    def template_messages(self) -> list[dict]:
        return template_messages(self.messages)


class ResponseInputItem(BaseModel):
    """An input item of the Responses API; only messages (type "message", or none) are supported."""
    model_config = ConfigDict(extra="ignore")
    type: str = "message"
    role: str | None = None
    content: str | list[ContentPart] | None = None


RESPONSES_IGNORED = {
    "store": "kvflow stores no responses (a later previous_response_id cannot find them)",
    "reasoning": "the model has no reasoning budget to set", "truncation": "a prompt that does not fit is refused",
    "parallel_tool_calls": "it only matters with tools, which are refused",
    "max_tool_calls": "it only matters with tools, which are refused",
    "metadata": "kvflow stores no responses", "service_tier": "kvflow has one tier",
}
RESPONSES_REFUSED = {
    "previous_response_id": "kvflow stores no responses: send the whole conversation as input",
    "conversation": "kvflow stores no conversations: send the whole conversation as input",
    "background": "background responses are not supported", "prompt": "prompt templates are not supported",
    "include": "no extra output can be included", "top_logprobs": "logprobs are not supported here yet",
}


class ResponsesRequest(_SamplingRequest):
    """POST /v1/responses: text in (a string, or messages with text content), text out, with vLLM's
    extra sampling fields; one output (n = 1)."""
    input: str | list[ResponseInputItem]
    instructions: str | None = None
    max_output_tokens: int | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None
    text: dict | None = None

    def sampling_params(self) -> SamplingParams:
        if self.tools:
            raise ProtocolError(f"tools: {TOOLS_UNSUPPORTED}", param="tools")
        if self.tool_choice not in (None, "none", "auto"):
            raise ProtocolError(f"tool_choice: {TOOLS_UNSUPPORTED}", param="tool_choice")
        if ((self.text or {}).get("format") or {}).get("type", "text") != "text":
            raise ProtocolError("a text format other than text is not supported yet", param="text.format")
        if self.n != 1:
            raise ProtocolError("a response has one output: n must be 1", param="n")
        extra = self.model_extra or {}
        for field, why in RESPONSES_REFUSED.items():
            if extra.pop(field, None) not in (None, False, []):
                raise ProtocolError(f"{field}: {why}", param=field)
        for field, why in RESPONSES_IGNORED.items():
            if extra.pop(field, None) not in (None, False):     # false asks for nothing
                ignored(field, why)
        return self._sampling_params(self.max_output_tokens, None)

    def template_messages(self) -> list[dict]:
        """The chat messages: `instructions` as a system message, then the input."""
        messages = [{"role": "system", "content": self.instructions}] if self.instructions else []
        if isinstance(self.input, str):
            return messages + [{"role": "user", "content": self.input}]
        for i, item in enumerate(self.input):
            param = f"input[{i}]"
            if item.type != "message" or item.role not in ("user", "assistant", "system", "developer"):
                raise ProtocolError(f"only message input items (roles user, assistant, system, developer) are "
                                    f"supported, not {item.type} {item.role or ''}".rstrip(), param=param)
            content = item.content
            if isinstance(content, list):
                if any(p.type not in ("input_text", "output_text", "text") for p in content):
                    raise ProtocolError("only text content (input_text, output_text) is supported",
                                        param=f"{param}.content")
                content = "".join(p.text or "" for p in content)
            role = "system" if item.role == "developer" else item.role     # as OpenAI reads it
            messages.append({"role": role, "content": content or ""})
        if not messages:
            raise ProtocolError("input must not be empty", param="input")
        return messages


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]


# ---- response bodies the OpenAPI spec declares (the generation bodies are built in responses.py) ------

class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorDetail


class HealthResponse(BaseModel):
    status: str


ERROR_RESPONSES = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 500, 503)}
# the generation routes answer JSON, or with `stream: true` server-sent events (their spec says both)
STREAM_RESPONSES = {200: {"description": "The answer as JSON, or with `stream: true` as server-sent events",
                          "content": {"text/event-stream": {}}}}
