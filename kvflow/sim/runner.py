"""The simulated model runner: the real runner's side of the step contract (kvflow/step.py), with a cost
model instead of a forward pass.

Like ModelRunner it learns a request from `new_requests` on its first schedule, keeps its own state by
request id (here: the seed of its made-up tokens, the block table it was told), applies `blocks_replaced`,
and forgets a request when its id comes in `finished_req_ids`; a scheduled request it was never told about
is an error, as in the real runner. A request that samples gets one token id (never one of its stop ids, so
outputs end by length as with ignore_eos), drawn from a per-request deterministic sequence. `execute`
returns the RunnerOutput and the step's seconds from the cost model. No torch.
"""
from __future__ import annotations

import zlib

from kvflow.sim.cost_model import CostModel
from kvflow.sim.workload import VOCAB
from kvflow.step import RunnerOutput, SchedulerOutput


class SimRunner:
    def __init__(self, cost: CostModel, track_tables: bool = False):
        self.cost = cost
        self.track_tables = track_tables       # keep block tables as the real runner does (tests; slower)
        self.seeds: dict[str, int] = {}
        self.stop_ids: dict[str, frozenset[int]] = {}   # of the requests that have any
        self.tables: dict[str, list[int]] = {}
        self.last_chunk: dict[str, int] = {}   # tokens of each request's latest prefill chunk (P/D transfer)
        self.num_steps = 0
        self.last_tokens = 0                   # tokens computed by the last step
        self.busy_s = 0.0

    def execute(self, sched: SchedulerOutput) -> tuple[RunnerOutput, float]:
        for rid in sched.finished_req_ids:
            self.seeds.pop(rid, None)
            self.stop_ids.pop(rid, None)
            self.tables.pop(rid, None)
            self.last_chunk.pop(rid, None)
        for new in sched.new_requests:
            self.seeds[new.req_id] = zlib.crc32(new.req_id.encode())
            if new.stop_ids:
                self.stop_ids[new.req_id] = frozenset(new.stop_ids)
        req_ids, sampled = [], []
        seeds, last_chunk, stop_ids, track = self.seeds, self.last_chunk, self.stop_ids, self.track_tables
        rows = prefill = context = 0           # the step's shape, as cost_model.step_shape counts it
        pairs = 0.0
        for s in sched.scheduled:
            rid = s.req_id
            seed = seeds.get(rid)
            if seed is None:
                raise RuntimeError(f"request {rid!r} scheduled before the runner was told about it")
            if track:
                self.tables[rid] = list(s.block_ids) if s.blocks_replaced else self.tables.get(rid, []) + s.block_ids
            n, start = len(s.token_ids), s.num_computed_tokens
            if n == 1 + s.num_spec_tokens:
                rows += n
                context += n * (start + 1)
            else:
                prefill += n
                pairs += n * (start + n / 2)
                last_chunk[rid] = n
            req_ids.append(rid)
            if s.sample:
                token = 1 + (seed + (start + n) * 2654435761) % (VOCAB - 1)
                stops = stop_ids.get(rid) if stop_ids else None   # (simulated requests have none)
                while stops and token in stops:
                    token = 1 + token % (VOCAB - 1)
                sampled.append([token])
            else:
                sampled.append([])
        out = RunnerOutput(req_ids, sampled, [None] * len(req_ids))
        seconds = self.cost.step_seconds(rows, prefill, context, pairs) if req_ids else 0.0
        self.num_steps += bool(req_ids)
        self.last_tokens = rows + prefill
        self.busy_s += seconds
        return out, seconds
