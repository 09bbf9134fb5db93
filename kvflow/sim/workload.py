"""What the simulated clients send: synthetic workloads and the trace file format.

A workload is an iterator of `SimRequest`s in arrival order, generated lazily (a million requests never sit
in memory at once). `parse_workload("chat:n=500,rate=8,seed=1")` or a trace file's path. Generators, the
token-level counterparts of `kvflow bench serve`'s datasets (kvflow/bench/datasets.py), deterministic for a
seed:

  random       uniform prompt and output lengths in [L(1-r), L(1+r)] (vLLM's random dataset), random tokens
  chat         the bench's chat mix: 45% short questions, 35% medium instructions, 20% long context that
               starts with one shared ~300-token system prompt (prefix caching reuses it)
  multitenant  tenants with their own 300-600-token system prompts, multi-turn sessions (turn k repeats the
               session's earlier turns), `user` = the session

Arrivals: Poisson at `rate` (gamma inter-arrivals with `burstiness` as `bench serve`), all at 0 for rate=inf,
and `bursts=K`: an on/off process whose rate is K times higher for `burst_duty` of every `burst_period` s
(same mean rate). Trace files: docs/sim.md (JSON lines; prompt token ids, or the chained hashes of its
blocks, which become tokens that share exactly the prefixes the hashes share).
"""
from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, fields

import numpy as np

from kvflow.memory.kv_cache_manager import extend_block_hashes

VOCAB = 49152                  # the default model's vocabulary (token ids are drawn below it)
TRACE_VERSION = 1


@dataclass
class SimRequest:
    arrival_s: float
    prompt_token_ids: list[int]
    output_len: int
    user: str | None = None


@dataclass
class WorkloadSpec:
    kind: str = "random"
    n: int = 100               # requests (multitenant: sessions x turns)
    rate: float = math.inf     # requests/s
    burstiness: float = 1.0    # gamma shape of inter-arrivals (1: Poisson)
    bursts: float = 1.0        # on/off: rate x this during bursts (1: none)
    burst_period: float = 10.0
    burst_duty: float = 0.2
    input: int = 256           # random: mean prompt length
    output: int = 0            # output length (random: mean); 0: the generator's own (random 128, chat: its
    #                            mix, multitenant 32)
    range: float = 0.0         # random: length spread ratio
    tenants: int = 6
    turns: int = 4
    seed: int = 0
    vocab: int = VOCAB         # token ids are drawn from [1, vocab): the served model's vocabulary

    def __post_init__(self):
        if self.kind not in GENERATORS:
            raise ValueError(f"workload must be a trace file or one of {', '.join(GENERATORS)}, got {self.kind!r}")
        for name in ("n", "input", "tenants", "turns"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"workload {name} must be a positive integer, got {getattr(self, name)!r}")
        if not isinstance(self.vocab, int) or self.vocab < 2:
            raise ValueError(f"workload vocab must be an integer >= 2, got {self.vocab!r}")
        if not isinstance(self.output, int) or self.output < 0:
            raise ValueError(f"workload output must be a non-negative integer, got {self.output!r}")
        if not self.rate > 0:
            raise ValueError(f"workload rate must be > 0 (or inf), got {self.rate!r}")
        if not 0 < self.burstiness < math.inf or not self.bursts >= 1 or not self.burst_period > 0:
            raise ValueError("workload burstiness must be positive, bursts >= 1 and burst_period > 0, got "
                             f"{self.burstiness!r}, {self.bursts!r}, {self.burst_period!r}")
        if not 0 < self.burst_duty < 1 or not 0 <= self.range < 1:
            raise ValueError(f"workload burst_duty must be in (0, 1) and range in [0, 1), got {self.burst_duty!r}, "
                             f"{self.range!r}")


def parse_workload(text: str) -> WorkloadSpec | str:
    """"KIND:key=value,..." -> WorkloadSpec; an existing file's path (or "trace:PATH") -> that path."""
    if text.startswith("trace:"):
        text = text[6:]
        if not os.path.isfile(text):
            raise ValueError(f"workload: no trace file {text!r}")
    if os.path.isfile(text):
        return text
    kind, _, rest = text.partition(":")
    types = {f.name: f.type for f in fields(WorkloadSpec)}
    kw: dict = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in types or key == "kind":
            raise ValueError(f"workload: expected KEY=VALUE with KEY in {', '.join(list(types)[1:])}, got {item!r}")
        try:
            kw[key] = float(value) if types[key] == "float" else int(value)
        except ValueError:
            raise ValueError(f"workload {key} must be a number, got {value!r}") from None
    return WorkloadSpec(kind=kind, **kw)


def workload_requests(workload: WorkloadSpec | str, block_size: int = 16) -> Iterator[SimRequest]:
    if isinstance(workload, str):
        return read_trace(workload)
    return GENERATORS[workload.kind](workload)


# ---- arrivals ---------------------------------------------------------------------------------------------

def arrivals(spec: WorkloadSpec) -> Iterator[float]:
    rng = random.Random(spec.seed * 7919 + 1)
    t = 0.0
    if math.isinf(spec.rate):
        while True:
            yield 0.0
    base = spec.rate / (spec.burst_duty * spec.bursts + 1 - spec.burst_duty)
    while True:
        if spec.bursts > 1:            # piecewise-constant rate: memoryless, so restart at each boundary
            phase = t % spec.burst_period
            on = phase < spec.burst_duty * spec.burst_period
            rate = base * spec.bursts if on else base
            edge = t - phase + (spec.burst_duty * spec.burst_period if on else spec.burst_period)
            gap = rng.expovariate(rate)
            if t + gap > edge:
                t = edge
                continue
            t += gap
        else:
            t += rng.gammavariate(spec.burstiness, 1.0 / (spec.rate * spec.burstiness))
        yield t


def _tokens(rng: np.random.Generator, n: int, vocab: int) -> list[int]:
    return rng.integers(1, vocab, size=n).tolist()


# ---- generators -------------------------------------------------------------------------------------------

def gen_random(spec: WorkloadSpec) -> Iterator[SimRequest]:
    rng = np.random.default_rng(spec.seed)
    lo_in, hi_in = max(1, int(spec.input * (1 - spec.range))), max(1, int(spec.input * (1 + spec.range)))
    out = spec.output or 128
    lo_out, hi_out = max(1, int(out * (1 - spec.range))), max(1, int(out * (1 + spec.range)))
    for _, t in zip(range(spec.n), arrivals(spec)):
        n_in, n_out = int(rng.integers(lo_in, hi_in + 1)), int(rng.integers(lo_out, hi_out + 1))
        yield SimRequest(t, _tokens(rng, n_in, spec.vocab), n_out)


def gen_chat(spec: WorkloadSpec) -> Iterator[SimRequest]:
    rng = np.random.default_rng(spec.seed)
    system = _tokens(np.random.default_rng(12345), 300, spec.vocab)      # the same in every long-context request
    brief = _tokens(np.random.default_rng(54321), 8, spec.vocab)
    for _, t in zip(range(spec.n), arrivals(spec)):
        u = rng.random()
        if u < 0.45:
            prompt, out = _tokens(rng, int(rng.integers(10, 31)), spec.vocab), int(rng.integers(16, 65))
        elif u < 0.80:
            prompt = brief + _tokens(rng, int(rng.integers(70, 221)), spec.vocab)
            out = int(rng.integers(64, 161))
        else:
            prompt = list(system)
            for _ in range(2 * int(rng.integers(1, 5))):       # the conversation's turns, then the new one
                prompt += _tokens(rng, int(rng.integers(28, 110)), spec.vocab)
            prompt += _tokens(rng, 12, spec.vocab)
            out = int(rng.integers(32, 129))
        yield SimRequest(t, prompt, spec.output or out)


def gen_multitenant(spec: WorkloadSpec) -> Iterator[SimRequest]:
    rng = np.random.default_rng(spec.seed)
    systems = [_tokens(np.random.default_rng(1000 + k), int(np.random.default_rng(2000 + k).integers(300, 601)),
                       spec.vocab) for k in range(spec.tenants)]
    num_sessions = -(-spec.n // spec.turns)
    tenant_of = [int(rng.integers(spec.tenants)) for _ in range(num_sessions)]
    order = [s for s in range(num_sessions) for _ in range(spec.turns)]    # turn k of s after its turn k-1
    rng.shuffle(order)
    history = [list(systems[tenant_of[s]]) for s in range(num_sessions)]
    out = spec.output or 32
    for (_, t), s in zip(zip(range(spec.n), arrivals(spec)), order):
        prompt = history[s] + _tokens(rng, int(rng.integers(20, 81)), spec.vocab)
        history[s] = prompt + _tokens(rng, out, spec.vocab)      # the next turn repeats this one and a fixed answer
        yield SimRequest(t, prompt, out, user=f"session-{s}")


GENERATORS = {"random": gen_random, "chat": gen_chat, "multitenant": gen_multitenant}


# ---- trace files --------------------------------------------------------------------------------------------

def write_trace(requests, path: str, block_size: int | None = None) -> int:
    """Write requests as a trace: token ids, or (block_size given) the chained hashes of the prompt's full
    blocks plus its length. Returns the number written."""
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps({"kvflow_trace": TRACE_VERSION, "block_size": block_size}) + "\n")
        for r in requests:
            row: dict = {"arrival_s": r.arrival_s, "output_len": r.output_len}
            if block_size:
                row["prompt_len"] = len(r.prompt_token_ids)
                row["block_hashes"] = extend_block_hashes([], r.prompt_token_ids, block_size)
            else:
                row["prompt_token_ids"] = r.prompt_token_ids
            if r.user is not None:
                row["user"] = r.user
            f.write(json.dumps(row) + "\n")
            n += 1
    return n


def _hash_tokens(h: int, n: int) -> list[int]:
    """Tokens standing for a block whose chained hash is h: equal chains -> equal tokens -> equal prefixes."""
    return np.random.default_rng(h & 0xFFFFFFFFFFFFFFFF).integers(1, VOCAB, size=n).tolist()


def read_trace(path: str) -> Iterator[SimRequest]:
    with open(path, encoding="utf-8") as f:
        block_size, last = None, -math.inf
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"trace {path}:{lineno}: not JSON ({e})") from None
            if "kvflow_trace" in row:
                if row["kvflow_trace"] != TRACE_VERSION:
                    raise ValueError(f"trace {path}: kvflow_trace must be {TRACE_VERSION}, got {row['kvflow_trace']!r}")
                block_size = row.get("block_size")
                continue
            req = _trace_row(row, block_size, f"trace {path}:{lineno}", lineno)
            if req.arrival_s < last:
                raise ValueError(f"trace {path}:{lineno}: arrival_s must not decrease")
            last = req.arrival_s
            yield req


def _trace_row(row: dict, block_size: int | None, where: str, salt: int) -> SimRequest:
    arrival, out = row.get("arrival_s"), row.get("output_len")
    if not isinstance(arrival, (int, float)) or arrival < 0:
        raise ValueError(f"{where}: arrival_s must be a number >= 0, got {arrival!r}")
    if not isinstance(out, int) or out < 1:
        raise ValueError(f"{where}: output_len must be a positive integer, got {out!r}")
    if "prompt_token_ids" in row:
        tokens = row["prompt_token_ids"]
        if not isinstance(tokens, list) or not tokens or not all(isinstance(t, int) and t >= 0 for t in tokens):
            raise ValueError(f"{where}: prompt_token_ids must be a non-empty list of token ids")
    elif "block_hashes" in row:
        hashes, n = row["block_hashes"], row.get("prompt_len")
        if not block_size:
            raise ValueError(f"{where}: block_hashes need the header's block_size")
        if not isinstance(n, int) or n < max(1, len(hashes) * block_size):
            raise ValueError(f"{where}: prompt_len must be an integer >= len(block_hashes) x block_size, got {n!r}")
        tokens = [t for h in hashes for t in _hash_tokens(int(h), block_size)]
        tokens += _hash_tokens(salt * 1_000_003 + int(arrival * 1e6), n - len(tokens))
    else:
        raise ValueError(f"{where}: a row needs prompt_token_ids or block_hashes")
    return SimRequest(float(arrival), tokens, out, row.get("user"))
