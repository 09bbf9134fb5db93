"""The OpenAI-compatible request bodies (pydantic) and the SamplingParams they ask for; the response
bodies are built in responses.py.

Fields follow OpenAI's API, plus vLLM's extra sampling fields (top_k, min_p, repetition_penalty,
ignore_eos, min_tokens, stop_token_ids, skip_special_tokens, include_stop_str_in_output).
Unknown fields are ignored, as OpenAI-compatible servers do.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kvflow.sampling.params import SamplingParams

MAX_N = 128


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
    """A request body: unknown fields are ignored, and text must be valid Unicode (no lone surrogates)."""
    model_config = ConfigDict(extra="ignore")

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
    # vLLM's extra sampling fields
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
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def as_template_message(self) -> dict:
        content = self.content
        if isinstance(content, list):
            if any(p.type != "text" for p in content):
                raise ProtocolError("only text content parts are supported", param="messages")
            content = "".join(p.text or "" for p in content)
        return {"role": self.role, "content": content or ""}


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    response_format: dict | None = None
    tools: list | None = None

    def sampling_params(self) -> SamplingParams:
        if self.response_format is not None and self.response_format.get("type", "text") != "text":
            raise ProtocolError("response_format other than text is not supported yet", param="response_format")
        if self.tools:
            raise ProtocolError("tools are not supported", param="tools")
        if self.top_logprobs is not None and not self.logprobs:
            raise ProtocolError("top_logprobs needs logprobs set to true", param="top_logprobs")
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return self._sampling_params(max_tokens, (self.top_logprobs or 0) if self.logprobs else None)

    def template_messages(self) -> list[dict]:
        return [m.as_template_message() for m in self.messages]


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
