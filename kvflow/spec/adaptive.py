"""How many tokens each request drafts (the survey's adaptive speculation, measured).

Per request: the acceptance rate a (each draft position accepted with probability a until the first
rejection; a running mean over its verifications). It drafts the longest k' <= k whose last draft is still
accepted with probability a**k' >= MIN_TAIL, and none for PAUSE_STEPS steps once a falls below MIN_RATE
(then it retries, judged after 2 verifications; a retry that fails pauses twice as long). When the
proposer's acceptance over all requests is below MIN_RATE, a new request starts paused. Per batch: speculation steps aside when the step-time model (kvflow/scheduler/costs.py,
learned from the measured steps) predicts that verifying B * (k + 1) tokens (as many decode rows) costs more
per emitted token than B plain decodes. No torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from kvflow.spec.config import SpeculativeConfig

MIN_TAIL = 0.25          # draft while the last draft's chance of acceptance is at least this
MIN_RATE = 0.2           # below this acceptance rate a request stops drafting for a while
MIN_VERIFICATIONS = 4    # ... judged after this many verifications
PAUSE_STEPS = 16         # ... for this many steps, doubled after each failed retry (up to 2**MAX_DOUBLINGS x)
MAX_DOUBLINGS = 5
RETRY_VERIFICATIONS = 2  # a retry after a pause is judged after this many verifications,
RETRY_RATE = 0.3         # ... starting from this acceptance rate
EMA = 0.3
PROPOSE_BINS = 20        # the ended requests' shares of asks given drafts, kept as a histogram of this many bins


@dataclass
class _Acceptance:
    rate: float = 0.5
    verifications: int = 0
    pause: int = 0
    strikes: int = 0          # pauses in a row without a good rate in between: each one twice as long


class SpecController:
    def __init__(self, config: SpeculativeConfig, step_time=None):
        self.k, self.adaptive, self.step_time = config.num_speculative_tokens, config.adaptive, step_time
        self.lookahead = config.lookahead     # the proposer writes KV at the drafted positions: allocate slots
        self.stats: dict[str, _Acceptance] = {}
        self.num_proposed = self.num_accepted = self.num_verifications = 0
        # per draft position (0: the first draft): verifications that tried it (each verification tries the
        # positions up to its first rejection), and that accepted it
        self.tried_at: list[int] = []
        self.accepted_at: list[int] = []
        # requests asked to draft, those the proposer gave drafts (an n-gram proposer has none without a match),
        # and the drafts it gave
        self.num_asked = self.num_offered = self.num_offered_tokens = 0
        # ... by request: [asked, given] while it lives; when it ends, its share given falls in one of
        # PROPOSE_BINS bins of [0, 1] (requests, and the sum of their shares: each bin's mean)
        self._proposals: dict[str, list[int]] = {}
        self.propose_bin_requests = [0] * PROPOSE_BINS
        self.propose_bin_rates = [0.0] * PROPOSE_BINS
        self.rate = 0.5                   # all requests' acceptance rate (the batch rule's)
        self.draft_s_per_token = 0.0      # the proposer's measured seconds per draft token asked (EMA)
        self._drafts_seen = False
        self._context = 0                 # this step's: the running requests' tokens
        self._pays: dict[int, bool] = {}  # this step's batch rule, by batch size

    def begin_step(self, context: int) -> None:
        """A new step: the running requests hold `context` tokens (the batch rule is computed anew)."""
        self._context = context
        self._pays.clear()

    def draft_len(self, request_id: str, batch_size: int) -> int:
        """How many tokens `request_id` drafts after this step (0: none)."""
        if not self.adaptive:
            return self.k
        pays = self._pays.get(batch_size)
        if pays is None:
            pays = self._pays[batch_size] = self.batch_pays(batch_size, self._context)
        if not pays:
            return 0
        a = self.stats.get(request_id)
        if a is None:
            if self.num_verifications < MIN_VERIFICATIONS * 4 or self.rate >= MIN_RATE:
                return self.k
            # the proposer rarely agrees with this model: a new request starts paused, retrying later
            a = self.stats[request_id] = _Acceptance(pause=PAUSE_STEPS, strikes=1)
        if a.pause > 0:
            a.pause -= 1
            if a.pause == 0:                       # retry, judged sooner, from a doubtful prior
                a.rate, a.verifications = RETRY_RATE, 0
            return 0
        if a.rate >= 1.0:
            return self.k
        if a.rate <= 0.0:
            return 1
        return max(1, min(self.k, int(math.log(MIN_TAIL) / math.log(a.rate))))

    @property
    def num_tried(self) -> int:
        """Draft positions tried, over every verification."""
        return sum(self.tried_at)

    def observe(self, request_id: str, proposed: int, accepted: int) -> None:
        """A verification of `proposed` drafts accepted `accepted` of them."""
        self.num_verifications += 1
        self.num_proposed += proposed
        self.num_accepted += accepted
        tries = accepted + (accepted < proposed)        # positions tried until the first rejection
        if len(self.tried_at) < tries:
            self.tried_at += [0] * (tries - len(self.tried_at))
            self.accepted_at += [0] * (tries - len(self.accepted_at))
        for i in range(tries):
            self.tried_at[i] += 1
        for i in range(accepted):
            self.accepted_at[i] += 1
        sample = accepted / tries
        a = self.stats.setdefault(request_id, _Acceptance())
        a.rate += EMA * (sample - a.rate)
        a.verifications += 1
        self.rate += 0.05 * (sample - self.rate)
        judged = a.verifications >= (MIN_VERIFICATIONS if a.strikes == 0 else RETRY_VERIFICATIONS)
        if judged and a.rate < MIN_RATE:
            a.pause = PAUSE_STEPS << min(a.strikes, MAX_DOUBLINGS)
            a.strikes += 1
        elif judged:
            a.strikes = 0

    def observe_proposals(self, asked, drafts: dict[str, list[int]]) -> None:
        """A step asked the requests `asked` (ids) to draft; `drafts`: what the proposer gave, by request id."""
        self.num_asked += len(asked)
        mine = self._proposals
        for rid in asked:
            got = drafts.get(rid)
            counts = mine.get(rid)
            if counts is None:
                counts = mine[rid] = [0, 0]
            counts[0] += 1
            if got:
                counts[1] += 1
                self.num_offered += 1
                self.num_offered_tokens += len(got)

    def observe_draft(self, seconds: float, tokens: int) -> None:
        """The proposer took `seconds` to draft `tokens` (a draft model's forwards; next to nothing for
        ngram): the batch rule adds that cost to a verification's."""
        if tokens > 0:
            sample = seconds / tokens
            self.draft_s_per_token += (sample - self.draft_s_per_token) * (1.0 if not self._drafts_seen else 0.2)
            self._drafts_seen = True

    def batch_pays(self, batch_size: int, context: int) -> bool:
        """Whether verifying drafts for a batch this size is predicted to emit tokens faster than decoding:
        the verification's k + 1 decode rows per request, plus the proposer's time for k drafts each (as
        measured per draft token, at whatever batch sizes it drafted: a batched draft costs less per token,
        so this errs toward stepping aside)."""
        model = self.step_time
        if model is None or not model.ready or batch_size <= 1:
            return True
        k, a = self.k, min(self.rate, 0.999)
        expected = 1 + sum(a ** i for i in range(1, k + 1))          # tokens a verification emits
        plain = model.predict(batch_size, 0, context) / batch_size      # a verification is k + 1 decode rows
        verify = model.predict(batch_size * (k + 1), 0, context * (k + 1))
        spec = (verify + batch_size * k * self.draft_s_per_token) / (batch_size * expected)
        return spec < plain

    def forget(self, request_id: str) -> None:
        """`request_id` ended: its share of asks given drafts joins the histogram."""
        self.stats.pop(request_id, None)
        counts = self._proposals.pop(request_id, None)
        if counts is not None:
            share = counts[1] / counts[0]
            i = min(int(share * PROPOSE_BINS), PROPOSE_BINS - 1)
            self.propose_bin_requests[i] += 1
            self.propose_bin_rates[i] += share

    @property
    def mean_accepted(self) -> float:
        """Accepted drafts per verification."""
        return self.num_accepted / self.num_verifications if self.num_verifications else 0.0
