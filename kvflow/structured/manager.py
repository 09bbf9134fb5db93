"""StructuredOutputManager: constrained decoding inside the engine core.

    add(request)          its grammar compiles on the compiler's thread; the request waits here, outside the
                          scheduler, so the batch never waits for a compile (state "compiling grammar")
    take_ready()          requests whose grammar is ready, in arrival order, each with a fresh matcher
    fill_bitmasks(sched)  for every constrained request that samples this step, the tokens its grammar
                          allows next, as bitmask bytes in the step's token_bitmasks (the runner's sampler masks
                          the batch's logits with them in one operation)
    advance(outputs)      each matcher accepts the tokens its request appended; a matcher that refuses one,
                          or that hits its engine's limit, ends the request
    jump_forward(rid)     the tokens the grammar forces next (SGLang's compressed FSM): appended without
                          sampling, computed with the next step's other tokens

A matcher only ever follows tokens that the request keeps: preemption (recompute or swap) keeps the output
tokens, so the matcher stays in step with them; tokens taken back are rolled back with `rollback`.
"""
from __future__ import annotations

import logging
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from kvflow.structured.backend import GrammarCompiler, GrammarMatcher, bitmask_words

logger = logging.getLogger("kvflow")


@dataclass
class _Compiling:
    request: object                 # the scheduler's Request
    features: dict | None
    future: Future
    started: float


class StructuredOutputManager:
    def __init__(self, compiler: GrammarCompiler, vocab_size: int, jump_forward: bool = True):
        self.compiler, self.vocab_size, self.enable_jump_forward = compiler, vocab_size, jump_forward
        self.matchers: dict[str, GrammarMatcher] = {}
        self.compiling: list[_Compiling] = []
        self.num_jump_forward_tokens = 0
        self._row = np.empty(bitmask_words(vocab_size), dtype=np.int32)

    def add(self, request, features: dict | None, now: float) -> None:
        spec = request.params.structured_outputs
        self.compiling.append(_Compiling(request, features, self.compiler.submit(spec), now))

    def take_ready(self, now: float) -> tuple[list[tuple[object, dict | None]], list[tuple[object, str]]]:
        """(requests ready to schedule, with their features), (requests whose grammar failed, with why):
        in arrival order, up to the first still compiling (the samples of n > 1 follow their first)."""
        ready, failed = [], []
        while self.compiling:
            c = self.compiling[0]
            if self.compiler.timed_out(c.future, c.started, now):
                failed.append((c.request, f"structured_outputs took more than {self.compiler.timeout_s:g} s to "
                                          "compile"))
            elif not c.future.done():
                break
            elif c.future.exception() is not None:
                failed.append((c.request, str(c.future.exception())))
            else:
                m = self.matchers[c.request.request_id] = self.compiler.backend.matcher(c.future.result())
                if c.request.output_token_ids and not m.accept(list(c.request.output_token_ids)):
                    del self.matchers[c.request.request_id]   # resumed elsewhere with tokens its grammar refuses
                    failed.append((c.request, "its grammar refuses the output it resumes from"))
                else:
                    ready.append((c.request, c.features))
            self.compiling.pop(0)
        return ready, failed

    def remove(self, request_ids) -> list:
        """Forget these requests; returns those that were still compiling (the scheduler never saw them)."""
        ids = set(request_ids)
        for rid in ids:
            self.matchers.pop(rid, None)
        gone = [c.request for c in self.compiling if c.request.request_id in ids]
        self.compiling = [c for c in self.compiling if c.request.request_id not in ids]
        return gone

    def fill_bitmasks(self, sched) -> list[str]:
        """Set the step's `token_bitmasks` of the scheduled requests that sample under a grammar. Returns the
        ids of requests whose matcher failed (they are to be ended: the runner samples them unconstrained)."""
        failed, end = [], 0
        for rid, n, sample in zip(sched.req_ids, sched.num_new_tokens, sched.sample):
            end += n                               # where its tokens end in the step's token_ids
            m = self.matchers.get(rid)
            if m is None or not sample:
                continue
            rows = []                              # k + 1 masks when it verifies k drafts
            k = sched.num_spec_tokens.get(rid, 0)
            drafts = sched.token_ids[end - k:end] if k else []
            for j in range(len(drafts) + 1):
                m.fill_bitmask(self._row)
                rows.append(self._row.tobytes())
                if j < len(drafts) and not m.accept([drafts[j]]):
                    break                          # (drafts were checked: cannot happen)
            m.rollback(len(rows) - 1)
            if m.error is not None or len(rows) != len(drafts) + 1:
                failed.append(rid)
                continue
            sched.token_bitmasks[rid] = b"".join(rows)
        return failed

    def valid_drafts(self, request_id: str, drafts: list[int]) -> int:
        """How many of the drafts, from the first, the grammar allows after the request's tokens."""
        m = self.matchers.get(request_id)
        if m is None:
            return len(drafts)
        n = 0
        while n < len(drafts) and m.accept([drafts[n]]):
            n += 1
        m.rollback(n)
        return n

    def advance(self, outputs) -> dict[str, str]:
        """Each constrained request's matcher accepts its new tokens. Returns {request id: why} for the
        requests that must end: a token the grammar refused, or a grammar engine's limit hit."""
        problems = {}
        for out in outputs:
            m = self.matchers.get(out.request_id)
            if m is None:
                continue
            if out.new_token_ids and not m.accept(out.new_token_ids):
                problems[out.request_id] = f"token {out.new_token_ids} is outside the grammar: {m.error or ''}"
            elif m.error is not None:
                problems[out.request_id] = m.error
            if out.finish_reason is not None:
                self.matchers.pop(out.request_id, None)
        return problems

    def is_terminated(self, request_id: str) -> bool:
        m = self.matchers.get(request_id)
        return m is not None and m.is_terminated()

    def end_token(self, stop_ids) -> int:
        """The end-of-sequence token a finished grammar takes: one of the request's stop ids if any is."""
        eos = self.compiler.backend.eos_token_ids
        return next((t for t in eos if t in stop_ids), eos[0])

    def jump_forward(self, request_id: str, max_tokens: int) -> list[int]:
        """The forced tokens (at most `max_tokens`), already accepted by the matcher; [] when there are none
        or jump-forward is off."""
        m = self.matchers.get(request_id)
        if m is None or not self.enable_jump_forward or max_tokens <= 0:
            return []
        tokens = m.jump_forward()[:max_tokens]
        if tokens and not m.accept(tokens):
            return []
        self.num_jump_forward_tokens += len(tokens)
        return tokens

    def __len__(self) -> int:
        return len(self.compiling)
