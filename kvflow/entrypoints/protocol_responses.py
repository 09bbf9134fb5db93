"""The Responses API's request body (`POST /v1/responses`) and the SamplingParams it asks for; its
response objects are built in responses_api.py."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from kvflow.entrypoints.protocol import ContentPart, ProtocolError, _SamplingRequest, ignored
from kvflow.sampling.params import SamplingParams

RESPONSES_TOOLS_UNSUPPORTED = "tool calling is not supported on /v1/responses yet (use /v1/chat/completions)"


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
            raise ProtocolError(f"tools: {RESPONSES_TOOLS_UNSUPPORTED}", param="tools")
        if self.tool_choice not in (None, "none", "auto"):
            raise ProtocolError(f"tool_choice: {RESPONSES_TOOLS_UNSUPPORTED}", param="tool_choice")
        if ((self.text or {}).get("format") or {}).get("type", "text") != "text":
            raise ProtocolError("a text format other than text is not supported yet", param="text.format")
        if self.n != 1:
            raise ProtocolError("a response has one output: n must be 1", param="n")
        c = self.constraint()
        extra = self.model_extra or {}
        for field, why in RESPONSES_REFUSED.items():
            if extra.pop(field, None) not in (None, False, []):
                raise ProtocolError(f"{field}: {why}", param=field)
        for field, why in RESPONSES_IGNORED.items():
            if extra.pop(field, None) not in (None, False):     # false asks for nothing
                ignored(field, why)
        return self._sampling_params(self.max_output_tokens, None, structured=c.params if c is not None else None)

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
