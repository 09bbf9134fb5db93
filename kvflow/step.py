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
    """One request's work in a step: a view of its entries in a SchedulerOutput (`rows()`), for the code that
    reads a step request by request (the model runner, the grammar step, tests)."""
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
    """A step. Its scheduled requests are columns, in step order (as vLLM's CachedRequestData): entry i of
    `req_ids`, `num_computed_tokens`, `num_new_tokens` and `sample` is the i-th request's, and `token_ids`
    holds every request's tokens one request after the other. What few requests have is kept by request id:
    blocks appended to a table since the last step (`new_block_ids`), whole tables that replace the runner's
    (`block_tables`: after fork, swap-in, recompute, copy-on-write), proposals to verify (`num_spec_tokens`:
    the last that many of its tokens), drafts to propose (`num_draft_tokens`), grammar masks (`token_bitmasks`).
    The scheduler writes a step and reads it back without an object or a token list per request (the
    simulator steps a thousand replicas' worth of them); `rows()` builds the objects for those who want them."""
    req_ids: list[str] = field(default_factory=list)
    num_computed_tokens: list[int] = field(default_factory=list)   # position of its first token this step
    num_new_tokens: list[int] = field(default_factory=list)
    sample: list[bool] = field(default_factory=list)    # it reaches the end of its known tokens: sample the last
    token_ids: list[int] = field(default_factory=list)  # the tokens to compute (their K/V are written this step)
    new_block_ids: dict[str, list[int]] = field(default_factory=dict)
    block_tables: dict[str, list[int]] = field(default_factory=dict)
    num_spec_tokens: dict[str, int] = field(default_factory=dict)
    num_draft_tokens: dict[str, int] = field(default_factory=dict)
    token_bitmasks: dict[str, bytes] = field(default_factory=dict)   # (ScheduledRequest.token_bitmask)
    new_requests: list[NewRequestData] = field(default_factory=list)
    block_ops: list[BlockOp] = field(default_factory=list)
    finished_req_ids: list[str] = field(default_factory=list)   # the runner drops their state

    def add(self, req_id: str, num_computed: int, token_ids: list[int], sample: bool = False, num_spec: int = 0,
            num_draft: int = 0, block_ids: list[int] = (), blocks_replaced: bool = False) -> None:
        """Append a request's work (the scheduler's one way to write a step)."""
        self.req_ids.append(req_id)
        self.num_computed_tokens.append(num_computed)
        self.num_new_tokens.append(len(token_ids))
        self.sample.append(sample)
        self.token_ids += token_ids
        if blocks_replaced:
            self.block_tables[req_id] = block_ids
        elif block_ids:
            self.new_block_ids[req_id] = block_ids
        if num_spec:
            self.num_spec_tokens[req_id] = num_spec
        if num_draft:
            self.num_draft_tokens[req_id] = num_draft

    def rows(self) -> list[ScheduledRequest]:
        """The scheduled requests as objects, in step order (built on each call: keep the list)."""
        out, offset = [], 0
        spec, drafts, masks = self.num_spec_tokens, self.num_draft_tokens, self.token_bitmasks
        for rid, start, n, sample in zip(self.req_ids, self.num_computed_tokens, self.num_new_tokens, self.sample):
            replaced = rid in self.block_tables
            blocks = self.block_tables[rid] if replaced else self.new_block_ids.get(rid, [])
            out.append(ScheduledRequest(rid, start, self.token_ids[offset:offset + n], list(blocks), replaced,
                                        sample, spec.get(rid, 0), masks.get(rid), drafts.get(rid, 0)))
            offset += n
        return out

    @classmethod
    def of(cls, rows: list[ScheduledRequest], **fields) -> SchedulerOutput:
        """A step of these requests (tests, tools)."""
        out = cls(**fields)
        for s in rows:
            out.add(s.req_id, s.num_computed_tokens, s.token_ids, s.sample, s.num_spec_tokens, s.num_draft_tokens,
                    s.block_ids, s.blocks_replaced)
            if s.token_bitmask is not None:
                out.token_bitmasks[s.req_id] = s.token_bitmask
        return out

    def shape(self) -> tuple[int, int, int, float]:
        """(decode rows, prefill tokens, decode context, prefill pairs): what a step's time depends on (the
        scheduler's step-time model, the simulator's cost model). A request computing one token, or its last
        token and k proposals, is 1 or k + 1 decode rows, each attending to its context; any other computes
        prompt tokens, each attending to the tokens before it (pairs: their sum)."""
        rows = prefill = context = 0
        pairs = 0.0
        spec = self.num_spec_tokens
        for rid, start, n in zip(self.req_ids, self.num_computed_tokens, self.num_new_tokens):
            if n == 1 or (spec and n == 1 + spec.get(rid, 0)):
                rows += n
                context += n * (start + 1)
            else:
                prefill += n
                pairs += n * (start + n / 2)
        return rows, prefill, context, pairs

    @property
    def num_scheduled_tokens(self) -> int:
        return len(self.token_ids)

    def __len__(self) -> int:
        return len(self.req_ids)


# A logprob entry: ([(token id, logprob)] for the sampled/prompt token first, then the top-N; its rank).
LogprobEntry = tuple[list[tuple[int, float]], int]


@dataclass(slots=True)
class RunnerOutput:
    """Per scheduled request, in the order of SchedulerOutput.req_ids."""
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
