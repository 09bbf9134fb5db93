"""Beam search inside the engine: every live beam is an engine-core request, and a beam that branches off
another forks its KV blocks (copy-on-write) instead of recomputing the shared prefix.

vLLM's API (`BeamSearchParams`, `BeamSearchSequence`, `BeamSearchOutput`, `LLM.beam_search`), Hugging
Face's algorithm (`generate(num_beams=W, length_penalty=..., early_stopping=...)`, do_sample=False):

- Every live beam decodes greedily with `logprobs = K`, K = max(2, 1 + number of eos ids) * W (2W when
  eos is ignored). Each step gives it its argmax token (appended by the engine) and its top-K raw
  logprobs (log_softmax of the logits, as HF's beam search scores).
- A round of one prompt: every live beam's top-K continuations, scored by cumulative logprob; the best K
  of all of them, in order. A candidate among the first W that ends (an eos token, or max_tokens reached)
  becomes a hypothesis scored `cum_logprob / generated_len ** length_penalty` (the eos counts in the
  length); the W best hypotheses are kept. The first W candidates that do not end are the next live beams.
- A live beam that continues with its own argmax stays the same request. Any other continuation is a new
  request whose prompt is the parent's tokens plus the candidate, with `fork_from=parent`: the scheduler
  admits it once the parent has computed those tokens minus the last, gives it the parent's blocks by
  reference and copies the shared tail block when either writes into it.
- A beam pruned with no child is aborted at once (its blocks are freed). A pruned beam with children
  lives until its children have been admitted (their fork needs it): the next round of its prompt cannot
  start before every live beam has a new token, so it is aborted then.
- The search of a prompt stops where HF stops: once W hypotheses are kept and `early_stopping` is True;
  or (False) when the best live beam's score divided by the current generated length ** length_penalty
  cannot beat the worst kept hypothesis ("never": by the longest possible length when length_penalty > 0);
  or when every candidate ends.

Beams need not advance in lockstep: a beam the scheduler runs ahead of the others (another beam of its
prompt is waiting for a seat or for blocks) keeps its extra tokens and logprobs queued; they are exactly
what the round needs if the beam continues with its argmax, and are dropped with the beam otherwise.

`BeamSearch` is the search of one prompt, without I/O: `first_request()`, `feed(EngineCoreOutput)`,
`ready()`, `advance()` (the requests to add and the ids to abort). `run_beam_search` drives a list of them
over an engine-core client in this process (`LLM.beam_search`); `AsyncLLM.beam_search` drives one from the
server's asyncio loop, over the engine-core process.

Differences from vLLM's beam search: the length penalty counts generated tokens only, as HF does (vLLM
counts the prompt too), and the stopping rule is HF's. Temperature must be 0: this is deterministic
beam search.
"""
from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from kvflow.engine.wire import EngineCoreOutput, EngineCoreRequest
from kvflow.sampling.params import MAX_LOGPROBS, SamplingParams

EARLY_STOPPING = (True, False, "never")


@dataclass
class BeamSearchParams:
    """vLLM's beam-search parameters, plus HF's `early_stopping` (True, False or "never")."""
    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False   # keep the eos that ended a hypothesis in its tokens and text
    early_stopping: bool | str = False

    def __post_init__(self) -> None:
        for name in ("beam_width", "max_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        for name in ("ignore_eos", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if not isinstance(self.temperature, (int, float)) or isinstance(self.temperature, bool) \
                or self.temperature != 0:
            raise ValueError(f"temperature must be 0.0 (kvflow's beam search is deterministic), "
                             f"got {self.temperature!r}")
        lp = self.length_penalty
        if not isinstance(lp, (int, float)) or isinstance(lp, bool) or not math.isfinite(lp):
            raise ValueError(f"length_penalty must be a finite number, got {lp!r}")
        self.length_penalty = float(lp)
        if not any(self.early_stopping is v or self.early_stopping == v and isinstance(v, str)
                   for v in EARLY_STOPPING):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")

    def num_candidates(self, num_eos: int) -> int:
        """K, the continuations each beam offers per round (HF's count); it must fit the logprobs limit."""
        k = max(2, 1 + (0 if self.ignore_eos else num_eos)) * self.beam_width
        if k > MAX_LOGPROBS:
            per_beam = k // self.beam_width
            raise ValueError(f"beam_width must be <= {MAX_LOGPROBS // per_beam} for this model ({per_beam} "
                             f"candidates per beam, at most {MAX_LOGPROBS} logprobs per step), "
                             f"got {self.beam_width}")
        return k


@dataclass
class BeamSearchSequence:
    """One hypothesis. `tokens`: the prompt and the generated tokens (the eos that ended it only with
    include_stop_str_in_output); `text`: those tokens decoded; `logprobs`: of each generated token in
    `tokens`; `cum_logprob` and `score` (cum_logprob / generated length ** length_penalty, HF's) count the
    eos whether or not it is in `tokens`."""
    tokens: list[int]
    logprobs: list[float]
    cum_logprob: float
    score: float
    finish_reason: str                 # "stop" (an eos ended it) | "length" (max_tokens)
    num_prompt_tokens: int
    text: str | None = None
    stop_reason: int | None = None     # the eos token that ended it

    @property
    def output_token_ids(self) -> list[int]:
        return self.tokens[self.num_prompt_tokens:]


@dataclass
class BeamSearchOutput:
    """The best hypotheses of one prompt, best first (at most beam_width)."""
    sequences: list[BeamSearchSequence]


@dataclass
class _Beam:
    request_id: str
    tokens: list[int]                  # prompt + generated
    logprobs: list[float]
    cum_logprob: float
    # (argmax token, top-K [(token, logprob)]) per step the engine ran ahead of the rounds
    pending: deque = field(default_factory=deque)


class BeamSearch:
    """The search of one prompt (no I/O): feed it the engine's outputs, advance it round by round."""

    def __init__(self, prompt_token_ids: list[int], params: BeamSearchParams, eos_token_ids, max_tokens: int,
                 new_id: Callable[[], str], priority: int = 0, client: str | None = None):
        self.prompt = list(prompt_token_ids)
        self.params = params
        self.eos = frozenset(() if params.ignore_eos else eos_token_ids)
        self.k = params.num_candidates(len(self.eos))
        self.max_tokens = max_tokens               # params.max_tokens clipped to the context left
        self.new_id = new_id
        self.priority, self.client = priority, client   # scheduling hints every beam carries
        self.live: dict[str, _Beam] = {}
        self.deferred: list[str] = []              # pruned beams whose children may still need their blocks
        self.hypotheses: list[tuple[float, list[int], list[float], float, str, int | None]] = []
        self.num_generated = 0                     # tokens of every live beam beyond the prompt
        self.done = False

    # ---- engine side ------------------------------------------------------------------------------------------

    def _request(self, request_id: str, tokens: list[int], fork_from: str | None) -> EngineCoreRequest:
        left = self.max_tokens - self.num_generated
        params = SamplingParams(n=1, temperature=0.0, max_tokens=left, ignore_eos=True, logprobs=self.k)
        # no stop ids: the search decides where a hypothesis ends; the engine stops a beam at max_tokens only
        return EngineCoreRequest(request_id, tokens, params, [], left, time.monotonic(), fork_from=fork_from,
                                 priority=self.priority, client=self.client)

    def first_request(self) -> EngineCoreRequest:
        rid = self.new_id()
        self.live[rid] = _Beam(rid, list(self.prompt), [], 0.0)
        return self._request(rid, list(self.prompt), None)

    def request_ids(self) -> list[str]:
        """Every request of this search the engine may still hold."""
        return list(self.live) + self.deferred

    def feed(self, out: EngineCoreOutput) -> None:
        beam = self.live.get(out.request_id)
        if beam is None:                           # a pruned beam's last steps
            return
        if out.finish_reason == "abort":
            raise RuntimeError(f"beam request {out.request_id!r} was aborted by the engine: {out.stop_reason}")
        if out.new_token_ids and (out.new_logprobs is None or len(out.new_logprobs) < len(out.new_token_ids)):
            raise RuntimeError(f"beam request {out.request_id!r} returned tokens without logprobs")
        for token, (entry, _rank) in zip(out.new_token_ids, out.new_logprobs or ()):
            beam.pending.append((token, entry[1:]))     # entry: [(token, logprob)], then the top-K

    def ready(self) -> bool:
        """True when every live beam has its next step's logprobs: a round can be made."""
        return not self.done and all(b.pending for b in self.live.values())

    # ---- one round --------------------------------------------------------------------------------------------

    def advance(self) -> tuple[list[EngineCoreRequest], list[str]]:
        """Make one round; returns (requests to add, request ids to abort)."""
        W, p = self.params.beam_width, self.params
        to_abort, self.deferred = self.deferred, []     # their children have all produced a token: forked
        candidates = []                                 # (cum logprob, beam, token, logprob)
        steps = {}
        for beam in self.live.values():
            steps[beam.request_id] = beam.pending.popleft()
            for token, logprob in steps[beam.request_id][1]:
                candidates.append((beam.cum_logprob + logprob, beam, token, logprob))
        candidates.sort(key=lambda c: -c[0])            # stable: beam order, then rank
        candidates = candidates[:self.k]
        gen_len = self.num_generated + 1
        at_max = gen_len >= self.max_tokens

        def ends(token: int) -> bool:
            return at_max or token in self.eos

        full = len(self.hypotheses) == W
        if not (full and p.early_stopping is True):
            for score, beam, token, logprob in candidates[:W]:
                if ends(token):
                    self._add_hypothesis(score, beam, token, logprob, gen_len, at_max and token not in self.eos)
        running = [c for c in candidates if not ends(c[2])][:W]
        self.num_generated = gen_len
        if not running or self._stop(running[0][0]):
            self.done = True
            return [], to_abort + list(self.live)
        # the next live beams, best first: a beam's own argmax keeps its request; other continuations fork it
        base = {rid: (list(b.tokens), list(b.logprobs)) for rid, b in self.live.items()}
        new_live: dict[str, _Beam] = {}
        new_requests, has_child = [], set()
        for score, beam, token, logprob in running:
            rid = beam.request_id
            tokens, logprobs = base[rid]
            if token == steps[rid][0] and rid not in new_live:
                beam.tokens, beam.logprobs, beam.cum_logprob = tokens + [token], logprobs + [logprob], score
                new_live[rid] = beam
                continue
            child_id = self.new_id()
            new_live[child_id] = _Beam(child_id, tokens + [token], logprobs + [logprob], score)
            new_requests.append(self._request(child_id, tokens + [token], rid))
            has_child.add(rid)
        for rid in self.live:
            if rid not in new_live:
                (self.deferred if rid in has_child else to_abort).append(rid)
        self.live = new_live
        return new_requests, to_abort

    def _add_hypothesis(self, cum: float, beam: _Beam, token: int, logprob: float, gen_len: int,
                        by_length: bool) -> None:
        score = cum / gen_len ** self.params.length_penalty
        reason, stop = ("length", None) if by_length else ("stop", token)
        self.hypotheses.append((score, beam.tokens + [token], beam.logprobs + [logprob], cum, reason, stop))
        self.hypotheses.sort(key=lambda h: -h[0])
        del self.hypotheses[self.params.beam_width:]

    def _stop(self, best_running: float) -> bool:
        """HF's rule: stop once W hypotheses are kept and, unless early_stopping is True, the best live beam
        cannot beat the worst of them (judged at the current length; "never": at the longest)."""
        p = self.params
        if len(self.hypotheses) < p.beam_width:
            return False
        if p.early_stopping is True:
            return True
        length = self.num_generated
        if p.early_stopping == "never" and p.length_penalty > 0:
            length = self.max_tokens
        return best_running / length ** p.length_penalty <= self.hypotheses[-1][0]

    def result(self, decode: Callable[[list[int]], str] | None = None) -> BeamSearchOutput:
        seqs = []
        for score, tokens, logprobs, cum, reason, stop in self.hypotheses:
            if reason == "stop" and not self.params.include_stop_str_in_output:
                tokens, logprobs = tokens[:-1], logprobs[:-1]     # cum_logprob keeps the eos's (as vLLM)
            seqs.append(BeamSearchSequence(tokens, logprobs, cum, score, reason, len(self.prompt),
                                           decode(tokens) if decode is not None else None, stop))
        return BeamSearchOutput(seqs)


def run_beam_search(client, searches: list[BeamSearch]) -> None:
    """Drive the searches to the end over an engine-core client in this process (add_request,
    abort_requests, step, has_unfinished). On any error every request of theirs is aborted."""
    owner: dict[str, BeamSearch] = {}
    try:
        for s in searches:
            req = s.first_request()
            owner[req.request_id] = s
            client.add_request(req)
        active = list(searches)
        while active:
            if not client.has_unfinished():
                raise RuntimeError("beam search: the engine holds none of the live beams")
            for out in client.step():
                s = owner.get(out.request_id)
                if s is not None:
                    s.feed(out)
            for s in active:
                while s.ready():
                    new_requests, aborts = s.advance()
                    if aborts:
                        client.abort_requests(aborts)
                    for req in new_requests:
                        owner[req.request_id] = s
                        client.add_request(req)
            active = [s for s in active if not s.done]
    except BaseException:
        ids = [rid for s in searches for rid in s.request_ids()]
        if ids:
            client.abort_requests(ids)
        raise
