"""The simulated model runner: the real runner's side of the step contract (kvflow/step.py), with a cost
model instead of a forward pass.

Like ModelRunner it learns a request from `new_requests` on its first schedule, keeps its own state by
request id (here: the seed of its made-up tokens, the block table it was told), applies `blocks_replaced`,
and forgets a request when its id comes in `finished_req_ids`; a scheduled request it was never told about
is an error, as in the real runner. A request that samples gets one token id (never one of its stop ids, so
outputs end by length as with ignore_eos), drawn from a per-request deterministic sequence: the token at
position p is `made_up_token(seed, p)`, the simulated target model's output. `execute` returns the
RunnerOutput and the step's seconds from the cost model: its forward's, plus its block ops' (swaps, copies
and the disk tier's host copies: CostModel.block_op_seconds, `block_bytes` a block). No torch.

Speculative decoding (the scheduler's `speculative=`; kvflow/spec): a request asked to draft
(`num_draft_tokens` d) gets d made-up drafts for the positions after its last sampled token. Each draft is
the target's own token at its position with probability `spec_acceptance` (a draw from the request's seed and
the position, so a run is deterministic) and another token otherwise; `spec_acceptance` is one number, or one
per draft position (the first draft's chance, the second's, ...; the last holds for the positions after it).
A request verifying k drafts gets, as from the real rejection sampler with a greedy proposer, its leading
drafts that equal the target's tokens plus one token: the target's at the first mismatch (the correction) or
after the last draft (the bonus). So each draft is accepted with its position's probability until the first
rejection, and the outputs are the same tokens with or without speculation. A request asked to draft gets
drafts at all with probability `spec_propose_rate` (a draw of its own; an n-gram proposer finds none without a
match in the context), and otherwise decodes its next step plainly; given a list of rates (the served requests'
own, by quantile), each request takes one of them for its life (a draw from its seed). The proposer's time
(RunnerOutput.draft_seconds, inside the step's): ngram none; layer_skip and draft_model their forwards as the
real proposers run them (a catch-up forward, then one batched one-token forward per further draft), each
priced as the target's step of that shape times the draft's share of the target's work: num_layers / the
model's layers for layer_skip; for draft_model DRAFT_MODEL_RATIO, an assumption (the config names a file, not a
size).
"""
from __future__ import annotations

import zlib

from kvflow.sim.cost_model import CostModel, acceptance_by_position, propose_rates
from kvflow.sim.workload import VOCAB
from kvflow.spec.config import SpeculativeConfig
from kvflow.step import RunnerOutput, SchedulerOutput

DEFAULT_ACCEPTANCE = 0.7     # per-draft-token acceptance rate, when the simulation does not say
PROPOSE_SALT = 0x5BD1E995    # the proposal draws' stream apart from the acceptance draws'
DRAFT_MODEL_RATIO = 0.1      # assumed: a draft model's step costs this share of the target's (same shape)
_M64 = (1 << 64) - 1


def made_up_token(seed: int, pos: int, stops) -> int:
    """The simulated target's token at position `pos` of the request with `seed` (never a stop id)."""
    token = 1 + (seed + pos * 2654435761) % (VOCAB - 1)
    while stops and token in stops:
        token = 1 + token % (VOCAB - 1)
    return token


def draw(seed: int, pos: int) -> float:
    """A uniform number in [0, 1) for (request seed, position): splitmix64's finalizer."""
    x = (seed * 0x9E3779B97F4A7C15 + (pos + 1) * 0xD1B54A32D192ED03) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return (x ^ (x >> 31)) / 18446744073709551616.0


def verify(drafts: list[int], seed: int, pos: int, stops) -> list[int]:
    """The tokens a verification of `drafts` (from position `pos`) emits, as the rejection sampler with a
    greedy proposer: the leading drafts that are the target's tokens, then the target's token at the first
    mismatch (the correction) or after the last draft (the bonus)."""
    tokens = []
    for draft in drafts:
        target = made_up_token(seed, pos, stops)
        if draft != target:
            break
        tokens.append(target)
        pos += 1
    tokens.append(made_up_token(seed, pos, stops))
    return tokens


class SimRunner:
    def __init__(self, cost: CostModel, track_tables: bool = False, speculative: SpeculativeConfig | None = None,
                 spec_acceptance: float | list[float] = DEFAULT_ACCEPTANCE, block_bytes: int = 0,
                 spec_propose_rate: float | list[float] = 1.0):
        acceptance = acceptance_by_position(spec_acceptance)
        # a request asked to draft gets drafts with this chance: one for all (propose_rate), or each request's
        # own, one of propose_rates (propose_rate None; request_propose holds the live requests')
        self.propose_rates = propose_rates(spec_propose_rate)
        self.propose_rate = self.propose_rates[0] if len(self.propose_rates) == 1 else None
        self.request_propose: dict[str, float] = {}
        self.cost, self.block_bytes = cost, block_bytes
        self.track_tables = track_tables       # keep block tables as the real runner does (tests; slower)
        self.seeds: dict[str, int] = {}
        self.stop_ids: dict[str, frozenset[int]] = {}   # of the requests that have any
        self.tables: dict[str, list[int]] = {}
        self.last_chunk: dict[str, int] = {}   # tokens of each request's latest prefill chunk (P/D transfer)
        self.num_steps = 0
        self.last_tokens = 0                   # tokens computed by the last step
        self.last_prefill = 0                  # ... of which prompt tokens
        self.last_rejected = 0                 # ... of which drafts the verification rejected
        self.busy_s = 0.0
        self.acceptance = acceptance           # by draft position (the last for every position after it)
        self.spec_k = speculative.num_speculative_tokens if speculative is not None else 0
        self.draft_ratio = 0.0                 # the proposer's forward vs the target's (0: ngram, no model)
        self.draft_held: dict[str, int] | None = None   # draft_model: positions its own KV cache holds
        # a learned length predictor's "hidden" feature of each request's prompt (kvflow/sim/features.py), with
        # its prompt's length: (length, feature), returned by the step that computes its last prompt token
        # (None: not wanted)
        self.hidden: dict[str, tuple[int, object]] | None = None
        if speculative is not None and speculative.method == "layer_skip":
            total = cost.profile.model["num_layers"]
            n = speculative.num_layers if speculative.num_layers is not None else max(1, total // 4)
            if n > total:
                raise ValueError(f"speculative_config.num_layers ({n}) must be at most the model's {total} layers")
            self.draft_ratio = n / total
        elif speculative is not None and speculative.method == "draft_model":
            self.draft_ratio, self.draft_held = DRAFT_MODEL_RATIO, {}

    def execute(self, sched: SchedulerOutput) -> tuple[RunnerOutput, float]:
        for rid in sched.finished_req_ids:
            self.seeds.pop(rid, None)
            self.stop_ids.pop(rid, None)
            self.tables.pop(rid, None)
            self.last_chunk.pop(rid, None)
            self.request_propose.pop(rid, None)
            if self.draft_held is not None:
                self.draft_held.pop(rid, None)
            if self.hidden is not None:
                self.hidden.pop(rid, None)
        rates = self.propose_rates
        for new in sched.new_requests:
            seed = self.seeds[new.req_id] = zlib.crc32(new.req_id.encode())
            if self.propose_rate is None:
                self.request_propose[new.req_id] = rates[int(draw(seed ^ PROPOSE_SALT, -1) * len(rates))]
            if new.stop_ids:
                self.stop_ids[new.req_id] = frozenset(new.stop_ids)
        sampled, drafts, asks = [], {}, []
        seeds, last_chunk, stop_ids, propose = self.seeds, self.last_chunk, self.stop_ids, self.propose_rate
        spec_counts, draft_counts, flat = sched.num_spec_tokens, sched.num_draft_tokens, sched.token_ids
        if self.track_tables:
            for rid, table in sched.block_tables.items():
                self.tables[rid] = list(table)
            for rid, ids in sched.new_block_ids.items():
                self.tables[rid] = self.tables.get(rid, []) + ids
        rows = prefill = context = rejected = 0   # the step's shape, as SchedulerOutput.shape counts it (one pass)
        pairs = 0.0
        end = 0                                   # where this request's tokens end in the step's token_ids
        for rid, start, n, sample in zip(sched.req_ids, sched.num_computed_tokens, sched.num_new_tokens,
                                         sched.sample):
            end += n
            seed = seeds.get(rid)
            if seed is None:
                raise RuntimeError(f"request {rid!r} scheduled before the runner was told about it")
            k = spec_counts.get(rid, 0) if spec_counts else 0
            if n == 1 + k:
                rows += n
                context += n * (start + 1)
            else:
                prefill += n
                pairs += n * (start + n / 2)
                last_chunk[rid] = n
            if sample:
                stops = stop_ids.get(rid) if stop_ids else None   # (simulated requests have none)
                if k:
                    tokens = verify(flat[end - k:end], seed, start + n - k, stops)
                    rejected += k + 1 - len(tokens)
                else:
                    tokens = [made_up_token(seed, start + n, stops)]
                sampled.append(tokens)
                num_draft = draft_counts.get(rid, 0) if draft_counts else 0
                if num_draft:                     # drafts for the positions after the last token sampled
                    pos = start + n - k + len(tokens)
                    good = 0
                    chance = propose if propose is not None else self.request_propose[rid]
                    if chance >= 1.0 or draw(seed ^ PROPOSE_SALT, pos) < chance:   # else none found
                        drafts[rid], good = self._drafts(seed, pos, num_draft, stops)
                    asks.append((rid, pos, num_draft, good))
            else:
                sampled.append([])
        req_ids = sched.req_ids
        out = RunnerOutput(list(req_ids), sampled, [None] * len(req_ids))
        seconds = self.cost.step_seconds(rows, prefill, context, pairs) if req_ids else 0.0
        for op in sched.block_ops:                # applied before the forward, as ModelRunner.execute does
            seconds += self.cost.block_op_seconds(op.kind, len(op.src) * self.block_bytes)
        if asks:                                  # the proposer runs inside the step, as in ModelRunner.execute
            out.draft_token_ids = drafts
            out.draft_tokens = sum(a[2] for a in asks)
            out.draft_seconds = self._proposer_seconds(asks) if self.draft_ratio else 0.0
            seconds += out.draft_seconds
        if self.hidden:
            self._prompt_hidden(sched, out)
        self.num_steps += bool(req_ids)
        self.last_tokens = rows + prefill
        self.last_prefill = prefill
        self.last_rejected = rejected
        self.busy_s += seconds
        return out, seconds

    def _prompt_hidden(self, sched: SchedulerOutput, out: RunnerOutput) -> None:
        """As ModelRunner._collect_hidden: the "hidden" feature of each request whose prompt ends this step."""
        hidden = self.hidden
        for rid, start, n, sample in zip(sched.req_ids, sched.num_computed_tokens, sched.num_new_tokens,
                                         sched.sample):
            got = hidden.get(rid) if sample else None
            if got is not None and start + n == got[0]:
                out.prompt_hidden[rid] = got[1]

    def _drafts(self, seed: int, pos: int, num: int, stops) -> tuple[list[int], int]:
        """`num` drafts from position `pos`: the target's token where the draw accepts, another one elsewhere;
        and how many lead before the first wrong one."""
        out, good = [], -1
        acceptance = self.acceptance
        last = len(acceptance) - 1
        for j, p in enumerate(range(pos, pos + num)):
            target = made_up_token(seed, p, stops)
            token = target
            if draw(seed, p) >= acceptance[j if j < last else last]:   # a wrong guess: another token, never a stop
                good = len(out) if good < 0 else good
                token = 1 + token % (VOCAB - 1)
                while (stops and token in stops) or token == target:
                    token = 1 + token % (VOCAB - 1)
            out.append(token)
        return out, num if good < 0 else good

    def _proposer_seconds(self, asks: list[tuple[str, int, int, int]]) -> float:
        """A model proposer's forwards for (request, tokens it knows L, drafts d, of which the target's
        leading ones) as the real ones batch them:
        a first forward over what its cache lacks (layer_skip: the last token, the rest are the target's
        layers' K/V; draft_model: everything since what it holds, prompt chunks as prefill rows), then d - 1
        one-token forwards; each priced as the target's step of that shape times draft_ratio."""
        cost, held, k = self.cost, self.draft_held, self.spec_k
        rows = prefill = context = 0
        pairs = 0.0
        for rid, L, d, good in asks:
            valid = L - 1 if held is None else min(held.get(rid, 0), L - 1)
            n = L - valid
            if n <= k + 1:
                rows += n
                context += n * (valid + 1)
            else:
                prefill += n
                pairs += n * (valid + n / 2)
            if held is not None:              # its cache then holds the last token and the drafts it fed back
                held[rid] = L + min(good, d - 1)
        seconds = cost.step_seconds(rows, prefill, context, pairs)
        for j in range(1, max(a[2] for a in asks)):
            live = [L + j for _, L, d, _ in asks if d > j]
            seconds += cost.step_seconds(len(live), 0, sum(live), 0.0)
        return self.draft_ratio * seconds
