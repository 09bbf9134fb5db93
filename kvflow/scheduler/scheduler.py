"""Continuous batching with chunked prefill under a token budget, and preemption by recompute or swap.

`schedule()` returns a plain-data `SchedulerOutput` (kvflow/step.py); `update_from_output()` applies the
runner's `RunnerOutput` and returns the engine core's outputs. One rule decides how many tokens a request
computes in a step: the tokens it knows (proposed ones included) minus the tokens it has computed, within
the step's budget. So prefill chunks, decodes and verification of proposed tokens mix freely in one step.
Running requests are served first, oldest first; waiting ones are admitted while the budget,
`max_num_seqs` and the KV blocks allow.

When a running request cannot get a block, the newest running request is preempted and goes back to the
front of the queue. Either its blocks are freed and it is recomputed later (its prompt and the tokens it
already generated), or they are swapped out to the swap tier and swapped back in when it resumes;
`PreemptionCost` picks the cheaper per request. No request is lost and its output does not change.

The policy (kvflow/scheduler/policy.py) orders the running and waiting requests, and may let a waiting
request take the seat of a running one that ranks after it. With a length predictor (kvflow/predict) every
request carries a predicted output length, which SJF and MLFQ rank by. With a TPOT target the step's token
budget follows a step-time model learned online (kvflow/scheduler/costs.py), decodes first. Without chunked
prefill a prompt is computed whole or waits (vLLM before chunking, Orca). With static reservation a request
gets the blocks of its whole possible length when admitted, and is never preempted (Orca).

A waiting request whose prefix continues in the disk tier waits in the loading-KV state while the tier
reads it, and other work steps on. A request with `fork_from` (the samples 1..n-1 of an n > 1 request)
waits until its source has computed the prompt, then forks its blocks (copy-on-write).

No torch here, and time comes from the injected clock: the simulator runs this scheduler unchanged.
"""
from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable

import numpy as np

from kvflow.config import KV_RESERVATIONS, PREEMPTION_MODES
from kvflow.engine.wire import EngineCoreOutput
from kvflow.memory.kv_cache_manager import KVCacheManager
from kvflow.predict.base import LengthPredictor, make_predictor
from kvflow.request import Request, RequestStatus
from kvflow.scheduler.admission import Admission
from kvflow.scheduler.costs import PreemptionCost, StepTimeModel
from kvflow.scheduler.policy import SchedulingPolicy, make_policy
from kvflow.spec.adaptive import SpecController
from kvflow.spec.config import SpeculativeConfig
from kvflow.step import NewRequestData, RunnerOutput, SchedulerOutput

__all__ = ["PreemptionCost", "Scheduler"]

MAX_DISPLACED = 4          # running requests a step may preempt to seat better-ranked waiting ones


class Scheduler(Admission):
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
                 preemption_mode: str = "auto", cost: PreemptionCost | None = None,
                 clock: Callable[[], float] = time.monotonic, policy: SchedulingPolicy | str = "fcfs",
                 predictor: LengthPredictor | None = None, tpot_slo_ms: float | None = None,
                 enable_chunked_prefill: bool = True, kv_reservation: str = "on-demand",
                 async_recovery: bool = False, speculative: SpeculativeConfig | None = None):
        if preemption_mode not in PREEMPTION_MODES:
            raise ValueError(f"preemption_mode must be one of {', '.join(PREEMPTION_MODES)}, got {preemption_mode!r}")
        if kv_reservation not in KV_RESERVATIONS:
            raise ValueError(f"kv_reservation must be one of {', '.join(KV_RESERVATIONS)}, got {kv_reservation!r}")
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        # without chunked prefill a whole prompt must fit one step's budget
        self.max_num_batched_tokens = max_num_batched_tokens if enable_chunked_prefill else max(
            max_num_batched_tokens, max_model_len)
        self.max_model_len = max_model_len
        self.preemption_mode = preemption_mode
        self.enable_chunked_prefill = enable_chunked_prefill
        self.static_reservation = kv_reservation == "static"
        self.async_recovery = async_recovery
        self._recovering: set[str] = set()        # swapped back in beside the current step: compute next step
        self.cost = cost or PreemptionCost(block_bytes=1)
        self.clock = clock
        self.policy = make_policy(policy) if isinstance(policy, str) else policy
        self.policy.bind(self)
        self.predictor = predictor or (make_predictor(None) if self.policy.needs_prediction else None)
        self.tpot_slo_s = tpot_slo_ms / 1000 if tpot_slo_ms else None
        self.step_time = StepTimeModel()
        self.spec = SpecController(speculative, self.step_time) if speculative is not None else None
        self.requests: dict[str, Request] = {}     # every live request, by id
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._unsent: set[str] = set()             # the runner has not been told about these yet
        self._finished: list[str] = []             # ended since the last step: the runner drops them
        self._now = 0.0                            # the clock at the start of the step being scheduled
        self.num_preemptions = 0
        self.num_swapped_out = 0                   # preemptions that went to the swap tier (the rest: recompute)
        self.num_displaced = 0                     # of those, to seat a better-ranked waiting request
        self.num_scheduled_tokens = 0              # tokens computed, all steps
        self.token_budget = self.max_num_batched_tokens   # the last step's
        self.predictor_error: float | None = None  # running mean |log2(predicted / true length)|

    # ---- requests in and out ---------------------------------------------------------------------------------

    def add_request(self, req: Request, features: dict[str, np.ndarray] | None = None) -> None:
        """Queue a request; `features`: what the length predictor reads of the model (kvflow/predict)."""
        if req.request_id in self.requests:
            raise ValueError(f"request_id {req.request_id!r} is already in use")
        if self.predictor is not None and req.length_estimate is None:
            req.length_estimate = self.predictor.predict(len(req.prompt_token_ids), req.client, features or {})
        self.requests[req.request_id] = req
        self.policy.on_add(req, self._now)
        self._unsent.add(req.request_id)
        self.waiting.append(req)

    def finish_requests(self, request_ids, status: RequestStatus) -> None:
        """End requests (stopped by the frontend, or aborted) wherever they are; unknown ids are ignored."""
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is not None:
                self._finish(req, status)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    @property
    def num_loading(self) -> int:
        return sum(1 for r in self.waiting if r.status == RequestStatus.WAITING_FOR_KV)

    # ---- one step ---------------------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(finished_req_ids=self._finished)
        self._finished = []
        now = self._now = self.clock()
        self.policy.order_running(self.running, now)
        self.policy.order_waiting(self.waiting, now)
        if self.policy.preemptive:
            self._displace(now)
        budget = self.token_budget = self._token_budget()
        if self.spec is not None:          # the batch rule of speculation reads the running requests' tokens
            self.spec.begin_step(sum(r.num_tokens for r in self.running))
        preempted = False
        running, kv, chunked = self.running, self.kv, self.enable_chunked_prefill
        i = 0
        while i < len(running) and budget > 0:
            req = running[i]
            proposed = req.spec_token_ids
            # tokens it knows (proposals included) minus those computed; len() rather than the Request
            # properties: this loop runs once per running request per step
            todo = len(req.all_token_ids) + len(proposed) - req.num_computed_tokens
            if proposed and todo > budget:
                del proposed[max(budget - (req.num_tokens - req.num_computed_tokens), 0):]   # never split
                todo = req.num_tokens_with_spec - req.num_computed_tokens
            num_new = todo if todo < budget else budget
            if num_new < todo and not chunked:
                i += 1                 # its whole remaining prompt does not fit this step: wait for one it fits
                continue
            while not kv.allocate_slots(req, num_new):
                victim = self.policy.pick_victim(running[i:])     # not one already in this step
                running.remove(victim)
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
            else:
                self._add_to_step(out, req, num_new)
                budget -= num_new
                i += 1
        # admit waiting requests (not in a step that had to preempt: memory is short)
        j = 0
        while j < len(self.waiting) and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            req = self.waiting[j]
            prefix = self._prefix(req)
            if prefix is None:             # still loading its KV, or its fork source is computing the prompt
                j += 1
                continue
            if not self._admit(req, budget, *prefix):
                if self.policy.stop_at_blocked:
                    break
                j += 1
                continue
            del self.waiting[j]
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            num_new = min(req.num_tokens_with_spec - req.num_computed_tokens, budget)
            self._add_to_step(out, req, num_new)
            budget -= num_new
        out.block_ops = self.kv.take_ops()
        self.num_scheduled_tokens += self.token_budget - budget    # = out.num_scheduled_tokens, without the sum
        return out

    def _displace(self, now: float) -> None:
        """While every seat is taken and the best ready waiting request outranks the worst running one, the
        latter is preempted (by swap or recompute: it resumes later where it was)."""
        n = 0
        while self.running and len(self.running) >= self.max_num_seqs and n < MAX_DISPLACED:
            best = next((r for r in self.waiting if r.status != RequestStatus.WAITING_FOR_KV and r.fork_from is None),
                        None)
            worst = self.running[-1]
            if best is None or not self.policy.outranks(best, worst, now):
                break
            self.running.pop()
            self._preempt(worst)
            self.num_displaced += 1
            n += 1
        if n:
            self.policy.order_waiting(self.waiting, now)

    def _token_budget(self) -> int:
        """The step's token budget: the fixed one, or with a TPOT target, the decodes plus the prefill tokens
        the step-time model says fit in the target (the decodes are then served first)."""
        if self.tpot_slo_s is None:
            return self.max_num_batched_tokens
        decodes = [r for r in self.running if r.num_tokens_with_spec - r.num_computed_tokens == 1]
        if not decodes:
            return self.max_num_batched_tokens
        self.running.sort(key=lambda r: r.num_tokens_with_spec - r.num_computed_tokens > 1)   # stable
        context = sum(r.num_tokens for r in decodes)
        start = next((r.num_computed_tokens for r in self.running if r.num_tokens - r.num_computed_tokens > 1), 0)
        prefill = self.step_time.prefill_budget(len(decodes), context, self.tpot_slo_s,
                                                self.max_num_batched_tokens, self.kv.block_size, start)
        return min(len(decodes) + prefill, self.max_num_batched_tokens)

    def record_step(self, sched: SchedulerOutput, seconds: float) -> None:
        """How long the runner took for this step (the step-time model learns from it)."""
        rows, prefill, context, pairs = sched.shape()
        self.step_time.observe(rows, prefill, context, seconds, pairs)

    def _add_to_step(self, out: SchedulerOutput, req: Request, num_new: int) -> None:
        rid, start = req.request_id, req.num_computed_tokens
        end = start + num_new
        known, proposed = req.all_token_ids, req.spec_token_ids
        num_known, num_proposed = len(known), len(proposed)
        if num_proposed and end > num_known:
            tokens = (known + proposed)[start:end]
        else:
            tokens = known[start:end]
        if rid in self._unsent:
            self._unsent.discard(rid)
            out.new_requests.append(NewRequestData(rid, req.prompt_token_ids, req.params, sorted(req.stop_ids)))
        sample = end == num_known + num_proposed
        draft = self.spec.draft_len(rid, len(self.running)) if self.spec and sample else 0
        if draft and self.spec.lookahead and not self.kv.allocate_slots(req, num_new, lookahead=draft):
            draft = 0                  # no free block for the drafts' KV: no drafts (never a preemption for them)
        block_ids, replaced = self.kv.block_update(rid)
        # positional (keywords cost more, once per request per step)
        out.add(rid, start, tokens, sample, num_proposed if sample else 0, draft, block_ids, replaced)

    def _preempt(self, req: Request) -> None:
        req.spec_token_ids = []
        swap = self.preemption_mode == "swap" or (
            self.preemption_mode == "auto"
            and self.cost.swap_s(len(self.kv.table(req.request_id))) < self.cost.recompute_s(req.num_computed_tokens))
        if swap and self.kv.swap_out(req):
            self.num_swapped_out += 1
        else:
            self.kv.free(req)
            req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def update_from_output(self, sched: SchedulerOutput, result: RunnerOutput) -> list[EngineCoreOutput]:
        """Advance the scheduled requests by what the step computed: roll back rejected proposals, append
        the sampled tokens, apply the token-level stop rules, free what finished. Returns the outputs."""
        outputs, now = [], self._now
        for rid, hidden in result.prompt_hidden.items():      # refine the prediction after the prefill
            req = self.requests.get(rid)
            if req is not None and self.predictor is not None and "hidden" in self.predictor.features:
                req.length_estimate = self.predictor.predict(
                    len(req.prompt_token_ids), req.client, {"hidden": np.asarray(hidden, dtype=np.float32)})
        requests, all_prompt_logprobs, drafts = self.requests, result.prompt_logprobs, result.draft_token_ids
        on_computed = self._policy_hook("on_computed")
        spec_counts = sched.num_spec_tokens
        if self.spec is not None and sched.num_draft_tokens:
            self.spec.observe_proposals(sched.num_draft_tokens, drafts)
        for rid, start, num_new, sampled, logprobs in zip(sched.req_ids, sched.num_computed_tokens,
                                                          sched.num_new_tokens, result.sampled_token_ids,
                                                          result.logprobs or [None] * len(sched.req_ids)):
            req = requests.get(rid)
            if req is None:                    # ended while the step ran
                continue
            req.num_computed_tokens += num_new
            num_spec = spec_counts.get(rid, 0) if spec_counts else 0
            if num_spec:                       # proposals after the first rejected one are not computed
                req.num_computed_tokens -= num_spec - max(len(sampled) - 1, 0)
                req.spec_token_ids = []
                self.kv.trim(req)
                if self.spec is not None:
                    self.spec.observe(req.request_id, num_spec, max(len(sampled) - 1, 0))
            prompt_logprobs = all_prompt_logprobs.get(rid) if all_prompt_logprobs else None
            if prompt_logprobs:
                req.num_prompt_logprobs += len(prompt_logprobs)
            new_tokens, status = self._append(req, sampled)
            if on_computed is not None:
                num_prompt = max(min(start + num_new, len(req.prompt_token_ids)) - start, 0)
                on_computed(req, num_prompt, len(new_tokens), now)
            if not new_tokens and not prompt_logprobs:
                continue
            if status is not None:
                self._finish(req, status)
            elif rid in drafts:                # to verify in its next step, within its limits
                room = min(req.max_tokens - req.num_output_tokens, self.max_model_len - req.num_tokens) - 1
                req.spec_token_ids = drafts[rid][:max(room, 0)]
            # positional, in field order (keywords double the cost of this once-per-request-per-step call)
            outputs.append(EngineCoreOutput(
                req.request_id,                                     # request_id
                new_tokens,                                         # new_token_ids
                logprobs[:len(new_tokens)] if logprobs is not None and new_tokens else None,   # new_logprobs
                status.value if status is not None else None,      # finish_reason
                req.stop_reason,                                    # stop_reason
                req.num_cached_tokens,                              # num_cached_tokens
                req.first_scheduled_time,                           # first_scheduled_time
                req.num_preemptions,                                # num_preemptions
                prompt_logprobs or None))                           # prompt_logprobs
        return outputs

    def _policy_hook(self, name: str):
        """The policy's method `name`, or None when it is the base class's no-op (then the per-request call,
        and what it would be passed, is skipped)."""
        hook = getattr(self.policy, name)
        return None if getattr(hook, "__func__", None) is getattr(SchedulingPolicy, name) else hook

    def _append(self, req: Request, tokens: list[int]) -> tuple[list[int], RequestStatus | None]:
        """Append tokens up to the first that ends the request; (the tokens appended, how it ended or None).
        The token-level stop rules are here, not in a method of their own: they run once per token."""
        outputs, known, stop_ids = req.output_token_ids, req.all_token_ids, req.stop_ids
        num_appended, status = 0, None
        for token in tokens:
            outputs.append(token)      # req.append_token(token), without the call
            known.append(token)
            num_appended += 1
            n = len(outputs)
            if token in stop_ids and n >= req.params.min_tokens:
                if token in (req.params.stop_token_ids or ()):
                    req.stop_reason = token
                status = RequestStatus.FINISHED_STOPPED
                break
            if n >= req.max_tokens or len(known) >= self.max_model_len:    # (req.num_tokens)
                status = RequestStatus.FINISHED_LENGTH
                break
        self.kv.cache_full_blocks(req)
        return tokens[:num_appended], status      # a copy: the caller's list is not handed on

    def append_forced(self, request_id: str, tokens: list[int]) -> tuple[list[int], RequestStatus | None]:
        """Append tokens that were not sampled (a grammar forced them: jump-forward); the next step computes
        them with the request's other new tokens. Same stop rules as sampled tokens."""
        req = self.requests[request_id]
        new_tokens, status = self._append(req, tokens)
        if status is not None:
            self._finish(req, status)
        return new_tokens, status

    def _finish(self, req: Request, status: RequestStatus) -> None:
        """End a request (stopped, length, or aborted) wherever it is, and give back its blocks."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.kv.forget(req)
        self._recovering.discard(req.request_id)
        if self.spec is not None:
            self.spec.forget(req.request_id)
        self.policy.on_finish(req)
        if status == RequestStatus.FINISHED_STOPPED and self.predictor is not None:
            self._observe_length(req)
        req.status = status
        req.finished_time = self.clock()
        del self.requests[req.request_id]
        self._unsent.discard(req.request_id)
        self._finished.append(req.request_id)

    def _observe_length(self, req: Request) -> None:
        """A request ended by itself: the predictor learns its length, and its error is tracked."""
        n = len(req.output_token_ids)
        if req.length_estimate is not None:
            err = abs(math.log2(max(req.length_estimate.mean(cap=req.max_tokens), 1.0) / max(n, 1)))
            self.predictor_error = err if self.predictor_error is None else 0.98 * self.predictor_error + 0.02 * err
        self.predictor.observe(len(req.prompt_token_ids), req.client, n)

    def check(self) -> None:
        """Assert that every block is free, cached, or held by a live request, exactly as often as held."""
        live = [r.request_id for r in self.running] + [r.request_id for r in self.waiting]
        assert sorted(live) == sorted(self.requests), "a request is lost or listed twice"
        self.kv.check(live)
