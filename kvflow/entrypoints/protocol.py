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

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kvflow.entrypoints import protocol_structured as S
from kvflow.entrypoints import tools as T
from kvflow.engine.beam_search import BeamSearchParams
from kvflow.sampling.params import SamplingParams
from kvflow.structured.params import StructuredOutputsParams

logger = logging.getLogger("kvflow")

MAX_N = 128
FUNCTIONS_UNSUPPORTED = "the legacy function-calling fields are not supported: use tools and tool_calls"
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
    # output constraints (protocol_structured.py): OpenAI's response_format, vLLM's extra fields
    response_format: Any = None
    structured_outputs: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    guided_whitespace_pattern: Any = None

    def constraint(self) -> S.Constraint | None:
        """The output constraint the request sets, if any; `structured_param` names its field."""
        try:
            c = S.constraint(self.response_format, self.structured_outputs,
                             {f: getattr(self, f) for f in S.GUIDED}, self.guided_whitespace_pattern)
        except S.StructuredError as e:
            raise ProtocolError(str(e), param=e.param) from None
        self._structured_param = c.param if c is not None else None
        return c

    @property
    def structured_param(self) -> str | None:
        """The field that set the output constraint (to name in the engine's refusal of it)."""
        return getattr(self, "_structured_param", None)

    def _sampling_params(self, max_tokens: int | None, logprobs: int | None,
                         prompt_logprobs: int | None = None,
                         structured: StructuredOutputsParams | None = None) -> SamplingParams:
        self.warn_unknown()
        if self.n > MAX_N:
            raise ProtocolError(f"n must be <= {MAX_N}, got {self.n}", param="n")
        if self.stream_options is not None and not self.stream:
            raise ProtocolError("stream_options is only allowed when stream is true", param="stream_options")
        kw = dict(n=self.n, presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                  seed=self.seed, stop=self.stop, stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos,
                  max_tokens=max_tokens, min_tokens=self.min_tokens, logprobs=logprobs,
                  skip_special_tokens=self.skip_special_tokens, logit_bias=self.logit_bias,
                  include_stop_str_in_output=self.include_stop_str_in_output, prompt_logprobs=prompt_logprobs,
                  structured_outputs=structured)
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
    # vLLM's beam search: n is the beam width (kvflow/engine/beam_search.py); HF's early_stopping
    use_beam_search: bool = False
    length_penalty: float = 1.0
    early_stopping: bool | str = False

    def beam_search_params(self, max_model_len: int) -> BeamSearchParams:
        """use_beam_search: the beam width is n; every field beam search cannot honour is refused, naming it."""
        self.warn_unknown()
        if self.n > MAX_N:
            raise ProtocolError(f"n must be <= {MAX_N}, got {self.n}", param="n")
        if self.best_of is not None and self.best_of != self.n:
            raise ProtocolError("best_of must equal n (the beam width) with use_beam_search", param="best_of")
        if self.constraint() is not None:
            raise ProtocolError("use_beam_search cannot be combined with an output constraint",
                                param=self.structured_param)
        unset = {"stream": not self.stream, "stream_options": self.stream_options is None, "echo": not self.echo,
                 "logprobs": self.logprobs is None, "suffix": not self.suffix, "stop": not self.stop,
                 "stop_token_ids": not self.stop_token_ids, "logit_bias": not self.logit_bias,
                 "presence_penalty": self.presence_penalty == 0, "frequency_penalty": self.frequency_penalty == 0,
                 "repetition_penalty": self.repetition_penalty in (None, 1), "top_p": self.top_p in (None, 1),
                 "top_k": self.top_k in (None, 0, -1), "min_p": self.min_p in (None, 0),
                 "min_tokens": self.min_tokens == 0}
        for name, ok in unset.items():
            if not ok:
                raise ProtocolError(f"{name} is not supported with use_beam_search", param=name)
        if self.temperature not in (None, 0):
            raise ProtocolError(f"temperature must be 0 or unset with use_beam_search (beam search is "
                                f"deterministic), got {self.temperature}", param="temperature")
        try:
            max_tokens = max_model_len if self.max_tokens is None else self.max_tokens
            return BeamSearchParams(beam_width=self.n, max_tokens=max_tokens,
                                    ignore_eos=self.ignore_eos, length_penalty=self.length_penalty,
                                    include_stop_str_in_output=self.include_stop_str_in_output,
                                    early_stopping=self.early_stopping)
        except ValueError as e:
            name = str(e).split(" ", 1)[0]
            raise ProtocolError(str(e), param={"beam_width": "n"}.get(name, name)) from None

    def sampling_params(self) -> SamplingParams:
        for name, unset in (("length_penalty", self.length_penalty == 1.0), ("early_stopping",
                                                                             self.early_stopping is False)):
            if not unset:
                raise ProtocolError(f"{name} only applies with use_beam_search: true", param=name)
        if self.best_of is not None and self.best_of != self.n:
            raise ProtocolError("best_of is not supported (only best_of == n)", param="best_of")
        if self.suffix:
            raise ProtocolError("suffix is not supported", param="suffix")
        # echo with logprobs also scores the prompt (the first prompt token has none)
        c = self.constraint()
        return self._sampling_params(self.max_tokens, self.logprobs,
                                     self.logprobs if self.echo and self.logprobs is not None else None,
                                     c.params if c is not None else None)

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
    """One chat message. Tool-call history (an assistant's `tool_calls`, a `tool` message with its
    `tool_call_id`) is rendered (tools.py); the legacy `function_call` and `function` messages are refused,
    not dropped: dropping them would change the conversation."""
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list | None = None
    tool_call_id: str | None = None
    function_call: dict | None = None

    def as_template_message(self, param: str = "messages") -> dict:
        if self.role == "function":
            raise ProtocolError(f"`function` messages: {FUNCTIONS_UNSUPPORTED}", param=f"{param}.role")
        if self.function_call:
            raise ProtocolError(f"function_call in a message: {FUNCTIONS_UNSUPPORTED}", param=f"{param}.function_call")
        content = self.content
        if isinstance(content, list):
            if any(p.type != "text" for p in content):
                raise ProtocolError("only text content parts are supported", param=param)
            content = "".join(p.text or "" for p in content)
        message = {"role": self.role, "content": content or ""}
        if self.name is not None:
            message["name"] = self.name          # for the templates that render it
        if self.tool_calls:
            if self.role != "assistant":
                raise ProtocolError("only assistant messages carry tool_calls", param=f"{param}.tool_calls")
            try:
                message["tool_calls"] = [T.history_call(c, f"{param}.tool_calls[{k}]")
                                         for k, c in enumerate(self.tool_calls)]
            except T.ToolsError as e:
                raise ProtocolError(str(e), param=e.param) from None
        if self.role == "tool" and self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


def template_messages(messages: list[ChatMessage]) -> list[dict]:
    return [m.as_template_message(f"messages[{i}]") for i, m in enumerate(messages)]


# Chat fields kvflow cannot honour, decided per field (issue 19, item 8). Harmless to ignore, as vLLM
# does: the answer is still the one the client asked for (a hint it cannot use, bookkeeping).
CHAT_IGNORED = {
    "reasoning_effort": "the model has no reasoning budget to set",
    "prediction": "predicted outputs only make a completion faster, never different",
    "store": "kvflow stores no completions", "metadata": "kvflow stores no completions",
    "service_tier": "kvflow has one tier", "verbosity": "the model has no verbosity control",
}
# Refused: the client would expect something kvflow does not do.
CHAT_REFUSED = {
    "web_search_options": "web search is not supported",
    "audio": "audio output is not supported",
    "functions": FUNCTIONS_UNSUPPORTED,
}


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    function_call: str | dict | None = None
    modalities: list[str] | None = None

    def tool_setup(self) -> tuple[list[T.Tool], T.ToolChoice]:
        """The checked tools and tool choice (tools.py); no tools means tool_choice none."""
        try:
            tools = T.parse_tools(self.tools) if self.tools is not None else []
            return tools, T.parse_tool_choice(self.tool_choice, tools, self.parallel_tool_calls)
        except T.ToolsError as e:
            raise ProtocolError(str(e), param=e.param) from None

    def sampling_params(self) -> SamplingParams:
        self.check_fields()
        if self.top_logprobs is not None and not self.logprobs:
            raise ProtocolError("top_logprobs needs logprobs set to true", param="top_logprobs")
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        c = self.constraint()
        structured = c.params if c is not None else None
        tools, choice = self.tool_setup()
        forced = T.forced_schema(choice, tools)
        if forced is not None:
            if c is not None:
                raise ProtocolError(f"tool_choice {choice.mode} generates the tool call under its own schema: "
                                    f"it cannot be combined with {c.param}", param="tool_choice")
            structured = StructuredOutputsParams(json=forced)
            self._structured_param = "tools"
        return self._sampling_params(max_tokens, (self.top_logprobs or 0) if self.logprobs else None,
                                     structured=structured)

    def check_fields(self) -> None:
        """Refuse the fields that ask for what kvflow does not do; warn once about those it ignores."""
        if self.function_call not in (None, "none", "auto"):     # "none" and "auto" ask for no call
            raise ProtocolError(f"function_call: {FUNCTIONS_UNSUPPORTED}", param="function_call")
        if self.modalities is not None and set(self.modalities) - {"text"}:
            raise ProtocolError("only the text modality is supported", param="modalities")
        extra = self.model_extra or {}
        if extra.pop("use_beam_search", None):
            raise ProtocolError("use_beam_search is supported by /v1/completions only", param="use_beam_search")
        for field, why in CHAT_REFUSED.items():
            if extra.pop(field, None) not in (None, []):        # {} still asks for web search
                raise ProtocolError(f"{field}: {why}", param=field)
        for field, why in CHAT_IGNORED.items():
            if extra.pop(field, None) not in (None, False):     # false asks for nothing
                ignored(field, why)

    def template_messages(self) -> list[dict]:
        return template_messages(self.messages)


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
    replicas: list[dict] | None = None      # with many replicas: each one's index, health, pid, restarts


ERROR_RESPONSES = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 500, 503)}
# the generation routes answer JSON, or with `stream: true` server-sent events (their spec says both)
STREAM_RESPONSES = {200: {"description": "The answer as JSON, or with `stream: true` as server-sent events",
                          "content": {"text/event-stream": {}}}}
