"""Beam search over the server's engine (AsyncLLM): the same `BeamSearch` as offline, driven from the
frontend's event loop as the beams' engine-core outputs arrive (AsyncLLM routes them here, raw, by request id).
"""
from __future__ import annotations

import asyncio
import uuid

from kvflow.engine.beam_search import BeamSearch, BeamSearchOutput, BeamSearchParams
from kvflow.engine.wire import EngineCoreOutput
from kvflow.sampling.params import SamplingParams


class BeamStream:
    """The raw engine-core outputs of one beam search's requests (every one counts: none is skipped)."""

    def __init__(self):
        self.outputs: list[EngineCoreOutput] = []
        self.error: BaseException | None = None
        self.event = asyncio.Event()

    def put(self, output: EngineCoreOutput) -> None:
        self.outputs.append(output)
        self.event.set()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.event.set()

    async def get(self) -> list[EngineCoreOutput]:
        await self.event.wait()
        self.event.clear()
        if self.error is not None:
            raise self.error
        outs, self.outputs = self.outputs, []
        return outs


async def beam_search(engine, prompt_token_ids: list[int], params: BeamSearchParams, request_id: str | None = None,
                      priority: int = 0, user: str | None = None, skip_special_tokens: bool = True
                      ) -> BeamSearchOutput:
    """Raises ValueError for a bad request, QueueFullError / EngineDeadError as AsyncLLM.add_request does."""
    if not isinstance(params, BeamSearchParams):
        raise ValueError(f"params must be a BeamSearchParams, got {type(params).__name__}")
    engine.check_admission(params.beam_width)
    ip = engine.input_processor
    ip.check(prompt_token_ids, SamplingParams(max_tokens=params.max_tokens, temperature=0.0))
    ip.check_hints(priority, user)
    base = request_id or uuid.uuid4().hex
    counter = iter(range(1 << 62))
    search = BeamSearch(prompt_token_ids, params, ip.eos_token_ids,
                        min(params.max_tokens, engine.max_model_len - len(prompt_token_ids)),
                        lambda: f"{base}-beam{next(counter)}", priority, user)
    stream = BeamStream()
    try:
        first = search.first_request()
        engine.beam_streams[first.request_id] = stream
        engine.client.add_request(first)
        while not search.done:
            for out in await stream.get():
                search.feed(out)
            while search.ready():
                new_requests, aborts = search.advance()
                engine._end_beams(aborts)
                for req in new_requests:
                    engine.beam_streams[req.request_id] = stream
                    engine.client.add_request(req)
    except BaseException:
        engine._end_beams(search.request_ids())
        raise
    finally:
        for rid in [r for r, st in engine.beam_streams.items() if st is stream]:
            del engine.beam_streams[rid]
    # the text of the generated tokens only, as vLLM's server answers
    return search.result(lambda t: engine.tokenizer.decode(t[len(prompt_token_ids):], skip_special_tokens))
