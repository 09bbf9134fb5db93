"""Elastic prefill/decode ratio (SplitWise's and TetriInfer's instance flipping): a worker changes roles
when the load mix changes. A role is the client's label only (a worker can run both phases), so a switch
is immediate: the worker finishes what it holds and receives the other phase's requests from then on.

The rule, checked as outputs arrive, at most once per `COOLDOWN_S`:
  - prompts pile up (queued prefill tokens per prefill worker above `PREFILL_HIGH` x the step's token
    budget) while decode workers are light (requests per decode worker under a quarter of max_num_seqs):
    the lightest decode worker becomes a prefill worker
  - decodes pile up (requests per decode worker above three quarters of max_num_seqs, or their KV cache
    over `KV_HIGH` full) while no prompt waits: the lightest prefill worker becomes a decode worker
One worker of each role is always kept.
"""
from __future__ import annotations

import dataclasses
import time

COOLDOWN_S = 5.0
PREFILL_HIGH = 4.0
KV_HIGH = 0.8


@dataclasses.dataclass
class RoleSwitch:
    time: float
    worker: int
    old: str
    new: str
    why: str


def choose_switch(roles: list[str], loads: list, sched, since_last: float) -> RoleSwitch | None:
    """The switch the load mix asks for now, or None. `loads`: ReplicaLoad per worker (extra
    "queued_prefill_tokens" set); `sched`: the SchedulerOptions (token budget, max_num_seqs)."""
    if since_last < COOLDOWN_S:
        return None
    pre = [ld for ld in loads if ld.healthy and roles[ld.index] == "prefill"]
    dec = [ld for ld in loads if ld.healthy and roles[ld.index] == "decode"]
    if not pre or not dec:
        return None
    queued = sum(ld.extra.get("queued_prefill_tokens", 0) for ld in pre) / len(pre)
    decoding = sum(ld.num_assigned for ld in dec) / len(dec)
    kv = max(ld.kv_cache_usage for ld in dec)
    if len(dec) > 1 and queued > PREFILL_HIGH * sched.max_num_batched_tokens and decoding < sched.max_num_seqs / 4:
        w = min(dec, key=lambda ld: ld.num_assigned)
        return RoleSwitch(time.time(), w.index, "decode", "prefill",
                          f"{queued:.0f} prompt tokens queued per prefill worker, {decoding:.1f} requests per "
                          f"decode worker")
    if len(pre) > 1 and queued == 0 and (decoding > 0.75 * sched.max_num_seqs or kv > KV_HIGH):
        w = min(pre, key=lambda ld: ld.num_assigned)
        return RoleSwitch(time.time(), w.index, "prefill", "decode",
                          f"no prompt queued, {decoding:.1f} requests per decode worker, KV {kv:.0%} full")
    return None
