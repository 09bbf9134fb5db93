"""The step contract between scheduling and execution, as plain data.

    Scheduler.schedule()               -> SchedulerOutput
    executor / ModelRunner.execute()   -> RunnerOutput
    Scheduler.update_from_output()     -> the engine core's outputs

A SchedulerOutput says, per request id, which tokens to compute this step and which KV blocks they use,
and which block operations to apply first; on a request's first schedule it also says what the runner
must know about it (prompt, sampling parameters, stop ids). The runner never sees a `Request`: it keeps
its own per-request state (token ids, seeded generator, block table) by request id, and forgets it when
the id appears in `finished_req_ids`.

One rule decides how many tokens a request computes in a step: the tokens it knows (proposed ones
included) minus the tokens it has computed. A request samples when the step reaches the end of its known
tokens; with k proposed tokens it returns up to k + 1 tokens, and the scheduler rolls back the computed
count by the proposals it rejected.

Everything here is dataclasses of ints, strings and lists (msgpack through kvflow.engine.wire), because
executors may live in other processes. No torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from kvflow.sampling.params import SamplingParams


@dataclass(slots=True)
class BlockOp:
    """Move KV blocks: `kind` names the handler (a tier registers its kinds with the runner), `src` and
    `dst` are block ids or tier keys, pairwise. Ops are applied in order, before the step's forward pass.

    copy       device block -> device block (copy-on-write)
    swap_out   device block -> swap-tier block;  swap_in: swap-tier block -> device block
    spill      device block -> disk tier, under the block hash in dst;  load: disk tier (hash) -> device block
    """
    kind: str
    src: list[int]
    dst: list[int]


@dataclass(slots=True)
class NewRequestData:
    """What the runner must know about a request, sent on its first schedule."""
    req_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    stop_ids: list[int]


@dataclass(slots=True)
class ScheduledRequest:
    """One request's work in a step."""
    req_id: str
    num_computed_tokens: int          # position of token_ids[0]
    token_ids: list[int]              # the tokens to compute (their K/V are written this step)
    block_ids: list[int]              # blocks appended to its table since the last step ...
    blocks_replaced: bool = False     # ... or, when True, its whole table (after fork, swap-in, recompute, CoW)
    sample: bool = False              # the step reaches the end of its known tokens: sample from the last
    num_spec_tokens: int = 0          # the last num_spec_tokens of token_ids are proposals to verify
    # structured output: the tokens its grammar allows next, when it samples under one (int32 little-endian
    # words, bit i of word i // 32 = token i; kvflow/structured); the sampler masks the others
    token_bitmask: bytes | None = None   # (k + 1 rows of it when it verifies k drafts)
    num_draft_tokens: int = 0         # speculative decoding: draft up to this many tokens after this step

    @property
    def num_new_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    new_requests: list[NewRequestData] = field(default_factory=list)
    block_ops: list[BlockOp] = field(default_factory=list)
    finished_req_ids: list[str] = field(default_factory=list)   # the runner drops their state

    @property
    def num_scheduled_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.scheduled)

    def __len__(self) -> int:
        return len(self.scheduled)


# A logprob entry: ([(token id, logprob)] for the sampled/prompt token first, then the top-N; its rank).
LogprobEntry = tuple[list[tuple[int, float]], int]


@dataclass(slots=True)
class RunnerOutput:
    """Per scheduled request, in the order of SchedulerOutput.scheduled."""
    req_ids: list[str] = field(default_factory=list)
    sampled_token_ids: list[list[int]] = field(default_factory=list)   # [] when it did not sample
    logprobs: list[list[LogprobEntry] | None] = field(default_factory=list)   # per sampled token
    prompt_logprobs: dict[str, list[LogprobEntry]] = field(default_factory=dict)   # computed this step
    # the final hidden state of the last prompt token, for requests whose prefill completed this step
    # (only when the runner is asked to collect it: a length predictor reads it)
    prompt_hidden: dict[str, list[float]] = field(default_factory=dict)
    # speculative decoding: the drafts proposed after this step's tokens, to verify in the next step
    draft_token_ids: dict[str, list[int]] = field(default_factory=dict)
    draft_seconds: float = 0.0        # ... the proposer's time this step (inside the step's time)
    draft_tokens: int = 0             # ... and the draft tokens it was asked for
