"""Turns EngineCoreOutputs (token ids) into RequestOutputs (text): incremental detokenization, stop
strings, logprobs formatting, and gathering the n samples of one request under its parent."""
from __future__ import annotations

from dataclasses import dataclass

from kvflow.detokenizer import IncrementalDetokenizer
from kvflow.engine.wire import EngineCoreOutput, EngineCoreRequest
from kvflow.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from kvflow.tokenizer import Tokenizer


@dataclass
class ParentState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    metrics: RequestMetrics
    completions: list[CompletionOutput]
    num_cached_tokens: int = 0
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None   # None first, as vLLM

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.completions)

    def to_output(self) -> RequestOutput:
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, self.completions,
                             self.finished, self.num_cached_tokens, self.metrics, self.prompt_logprobs)


@dataclass
class ChildState:
    parent: ParentState
    index: int
    detok: IncrementalDetokenizer
    want_logprobs: bool
    include_stop_token: bool
    want_prompt_logprobs: bool = False   # the first sample carries the parent's prompt logprobs


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.children: dict[str, ChildState] = {}
        self.parents: dict[str, ParentState] = {}

    def add_request(self, request_id: str, prompt: str | None, samples: list[EngineCoreRequest]) -> None:
        """Track a request's samples (its engine-core requests, from the input processor) under one
        RequestOutput."""
        if request_id in self.parents:
            raise ValueError(f"request_id {request_id!r} is already in use")
        first = samples[0]
        params, child_ids = first.params, [r.request_id for r in samples]
        parent = ParentState(request_id, prompt, list(first.prompt_token_ids), RequestMetrics(first.arrival_time, priority=first.priority),
                             [CompletionOutput(i, "", []) for i in range(params.n)])
        self.parents[request_id] = parent
        if params.prompt_logprobs is not None:
            parent.prompt_logprobs = [None]
        for i, cid in enumerate(child_ids):
            detok = IncrementalDetokenizer(self.tokenizer, parent.prompt_token_ids, params.skip_special_tokens,
                                           params.stop, params.include_stop_str_in_output)
            self.children[cid] = ChildState(parent, i, detok, params.logprobs is not None,
                                            params.include_stop_str_in_output,
                                            i == 0 and params.prompt_logprobs is not None)

    def process(self, outputs: list[EngineCoreOutput], now: float) -> tuple[list[RequestOutput], list[str]]:
        """Apply one step's outputs. Returns the updated parents' RequestOutputs and the child ids that a
        stop string finished (the engine core must stop those: EngineCoreClient.stop_requests)."""
        updated: dict[str, ParentState] = {}
        stopped: list[str] = []
        for out in outputs:
            child = self.children.get(out.request_id)
            if child is None:
                continue
            parent = child.parent
            comp = parent.completions[child.index]
            comp.token_ids.extend(out.new_token_ids)
            new_ids = out.new_token_ids
            if out.finish_reason == "stop" and not child.include_stop_token:
                new_ids = new_ids[:-1]         # the eos / stop token is not part of the text (as vLLM)
            delta, stop = child.detok.step(new_ids) if new_ids else ("", None)
            if child.want_logprobs and out.new_logprobs:
                self._add_logprobs(comp, out.new_logprobs)
            if child.want_prompt_logprobs and out.prompt_logprobs:
                parent.prompt_logprobs.extend(self._logprob_dicts(out.prompt_logprobs))
            metrics = parent.metrics
            if metrics.first_token_time is None and out.new_token_ids:
                metrics.first_token_time = now
                metrics.first_scheduled_time = out.first_scheduled_time
            metrics.num_preemptions = max(metrics.num_preemptions, out.num_preemptions)
            parent.num_cached_tokens = out.num_cached_tokens
            if stop is not None:
                comp.finish_reason, comp.stop_reason = "stop", stop
                if out.finish_reason is None:      # still running in the engine core
                    stopped.append(out.request_id)
            elif out.finish_reason is not None:
                delta += child.detok.flush()
                comp.finish_reason, comp.stop_reason = out.finish_reason, out.stop_reason
            comp.text += delta
            if comp.finish_reason is not None:
                del self.children[out.request_id]
            updated[parent.request_id] = parent
        results = []
        for parent in updated.values():
            if parent.finished:
                parent.metrics.finished_time = now
                del self.parents[parent.request_id]
            results.append(parent.to_output())
        return results, stopped

    def abort(self, parent_id: str) -> list[str]:
        """Forget a parent request; returns its unfinished child ids."""
        parent = self.parents.pop(parent_id, None)
        if parent is None:
            return []
        ids = [cid for cid, c in self.children.items() if c.parent is parent]
        for cid in ids:
            parent.completions[self.children.pop(cid).index].finish_reason = "abort"
        return ids

    def _add_logprobs(self, comp: CompletionOutput, new_logprobs: list) -> None:
        if comp.logprobs is None:
            comp.logprobs, comp.cumulative_logprob = [], 0.0
        comp.logprobs.extend(self._logprob_dicts(new_logprobs))
        comp.cumulative_logprob += sum(entries[0][1] for entries, _ in new_logprobs)

    def _logprob_dicts(self, entries_ranks: list) -> list[dict[int, Logprob]]:
        """([(token, logprob), then the top-N], rank of the token) -> {id: Logprob}, the token first
        unless it is in the top-N (vLLM's layout)."""
        dicts = []
        for entries, rank in entries_ranks:
            (sampled_id, sampled_lp), top = entries[0], entries[1:]
            d = {tid: Logprob(lp, r + 1, self.tokenizer.decode([tid], skip_special_tokens=False))
                 for r, (tid, lp) in enumerate(top)}
            if sampled_id not in d:
                d = {sampled_id: Logprob(sampled_lp, rank, self.tokenizer.decode([sampled_id], skip_special_tokens=False)),
                     **d}
            dicts.append(d)
        return dicts
