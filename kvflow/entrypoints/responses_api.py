"""The Responses API's bodies (POST /v1/responses, routes_responses.py): the response object, whole or as
server-sent events in OpenAI's order, each with its `event:` line and a sequence number:

    response.created, response.in_progress, response.output_item.added, response.content_part.added,
    response.output_text.delta..., response.output_text.done, response.content_part.done,
    response.output_item.done, then response.completed (or response.incomplete at max_output_tokens)

A failure mid-stream is an `error` event. There is no `data: [DONE]`, as OpenAI sends none.
"""
from __future__ import annotations

import json
from collections.abc import AsyncIterator

from kvflow.entrypoints import protocol_responses as PR
from kvflow.entrypoints.responses import created, error_body, new_id
from kvflow.outputs import RequestOutput


class ResponseContext:
    """One response: its id, the request's settings echoed back, and what its stream has sent."""

    def __init__(self, req: PR.ResponsesRequest, model: str, num_prompt_tokens: int):
        self.req, self.model, self.prompt_tokens = req, model, num_prompt_tokens
        self.id, self.msg_id, self.created = new_id("resp"), new_id("msg"), created()
        self.seq = 0
        self.text, self.output_tokens, self.cached_tokens = "", 0, 0

    # ---- the response object ----------------------------------------------------------------------------

    def usage(self) -> dict:
        return {"input_tokens": self.prompt_tokens, "input_tokens_details": {"cached_tokens": self.cached_tokens},
                "output_tokens": self.output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": self.prompt_tokens + self.output_tokens}

    def part(self) -> dict:
        return {"type": "output_text", "text": self.text, "annotations": [], "logprobs": []}

    def message(self, status: str) -> dict:
        return {"type": "message", "id": self.msg_id, "status": status, "role": "assistant",
                "content": [self.part()] if status != "in_progress" else []}

    def body(self, status: str, finish: str | None = None) -> dict:
        """The response object; `status` in_progress (no output yet), completed or incomplete."""
        req = self.req
        done = status != "in_progress"
        return {"id": self.id, "object": "response", "created_at": self.created, "status": status,
                "error": None,
                "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
                "model": self.model, "output": [self.message("completed" if status == "completed" else status)]
                if done else [], "parallel_tool_calls": False, "previous_response_id": None,
                "reasoning": {"effort": None, "summary": None}, "store": False,
                "temperature": req.temperature if req.temperature is not None else 1.0,
                "text": {"format": {"type": "text"}}, "tool_choice": "none", "tools": [],
                "top_p": req.top_p if req.top_p is not None else 1.0, "truncation": "disabled",
                "usage": self.usage() if done else None, "user": req.user, "metadata": {}}

    def _finish(self, out: RequestOutput) -> str:
        comp = out.outputs[0]
        self.text, self.output_tokens = comp.text, len(comp.token_ids)
        self.cached_tokens = max(out.num_cached_tokens, 0)
        return "incomplete" if comp.finish_reason == "length" else "completed"

    def response(self, final: RequestOutput) -> dict:
        return self.body(self._finish(final))

    # ---- the stream ------------------------------------------------------------------------------------

    def frame(self, event: dict) -> str:
        """An event as SSE: its `event:` line and its data, with the next sequence number."""
        event = {**event, "sequence_number": self.seq}
        self.seq += 1
        return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False, separators=(',', ':'))}\n\n"

    @staticmethod
    def error_event(message: str, status: int) -> dict:
        err = error_body(message, status)["error"]
        return {"type": "error", "code": err["type"], "message": message, "param": None}

    def _text_event(self, kind: str, **kw) -> dict:
        return {"type": f"response.{kind}", "item_id": self.msg_id, "output_index": 0, "content_index": 0, **kw}

    async def stream(self, outputs: AsyncIterator[tuple[int, RequestOutput]]) -> AsyncIterator[dict]:
        yield {"type": "response.created", "response": self.body("in_progress")}
        yield {"type": "response.in_progress", "response": self.body("in_progress")}
        yield {"type": "response.output_item.added", "output_index": 0, "item": self.message("in_progress")}
        yield self._text_event("content_part.added", part={"type": "output_text", "text": "", "annotations": [],
                                                           "logprobs": []})
        final = None
        async for _, out in outputs:
            comp = out.outputs[0]
            delta = comp.text[len(self.text):]
            self.text, self.output_tokens = comp.text, len(comp.token_ids)
            if delta:
                yield self._text_event("output_text.delta", delta=delta, logprobs=[])
            final = out
        status = self._finish(final) if final is not None else "incomplete"
        yield self._text_event("output_text.done", text=self.text, logprobs=[])
        yield self._text_event("content_part.done", part=self.part())
        yield {"type": "response.output_item.done", "output_index": 0, "item": self.message(status)}
        yield {"type": f"response.{status}", "response": self.body(status)}
