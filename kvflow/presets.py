"""The survey's runtimes as presets (survey tables 2 and 3; DESIGN.md's runtime table).

A preset is a set of engine options: batching, prioritisation, memory and preemption, persistence, the way
the survey describes that system. `EngineConfig.from_kwargs(preset=NAME, **explicit)` (and so `LLM(preset=...)`
and `kvflow serve --preset NAME`) applies it first; every option given explicitly overrides it. What a preset
sets is logged when it is applied (`describe`).

| preset    | batching                                   | prioritisation      | memory / preemption                               | persistence           |
|-----------|--------------------------------------------|---------------------|---------------------------------------------------|-----------------------|
| orca      | continuous, fixed batch size               | FCFS                | static per-request reservation, no preemption     | none                  |
| vllm      | continuous, fixed batch size               | FCFS                | paged with swap tier, swap vs recompute by cost   | none                  |
| sarathi   | continuous + chunked prefill, token budget | FCFS                | paged with swap tier, by cost                     | none                  |
| sglang    | continuous + chunked prefill, token budget | longest prefix      | paged, always recompute                           | prefix cache, LRU     |
| fastserve | continuous, fixed batch size               | MLFQ (skip-join)    | paged with swap tier, always offload              | none                  |
| preble    | continuous + chunked prefill, token budget | by cache hit        | paged, always recompute                           | prefix cache, LRU     |
| distserve | continuous, fixed batch size; P/D, sync    | FCFS                | paged                                             | none                  |
| tetriinfer| continuous + chunked prefill; P/D, sync    | FCFS                | paged                                             | none                  |
| splitwise | continuous + chunked prefill; P/D, async   | FCFS                | paged, always recompute                           | none                  |
| mooncake  | continuous + chunked prefill; P/D, layerwise| FCFS               | paged + shared KV pool, early rejection           | prefix cache + pool   |
| deepflow  | continuous + chunked prefill, token budget | FCFS                | paged + host, always recompute                    | prefix cache, LRU     |
| kvflow    | continuous + chunked prefill, token budget | FCFS                | paged with swap tier, by cost                     | prefix cache, LRU     |

preble also routes (with `replicas=N`): cache-aware, max prefix hit unless that replica is overloaded, then
min load, hot prefixes replicated to a second replica (kvflow/cluster/routers/cache_aware.py). Its local
queue is ordered by prefix-cache hit (the `cache-aware` policy), which stands in for Preble's priority by
cache hit; kvflow has no separate MLFQ-by-hit policy.

The P/D presets place prefills with `router` and decodes with `pd_policy` (DistServe: min queue / min load;
TetriInfer: min load / power of two; SplitWise: min queue for both; Mooncake: min predicted TTFT for both),
on one prefill and one decode worker unless `prefill_replicas` / `decode_replicas` say otherwise.
A decode worker takes the KV it is handed into its prefix cache (under the blocks' chained hashes), so
prefix caching stays on in the P/D presets even where the survey lists no persistence.
deepflow is serverless (kvflow/serverless): replicas on Ray Serve, scaled with load and to zero, routed by
max prefix hit unless overloaded (cache-aware).

"fixed batch size": no chunked prefill, a prompt is computed whole in one step. Sarathi-Serve's budget is
512 tokens (its paper's setting for strict TPOT; `kvflow tune` finds one for this machine). kvflow's own row is
its defaults, which the scheduling benchmark (benchmarks/scheduling.py) compares with the others.
"""
from __future__ import annotations

import logging

logger = logging.getLogger("kvflow")

PRESETS: dict[str, dict] = {
    "orca": dict(enable_chunked_prefill=False, scheduling_policy="fcfs", kv_reservation="static",
                 enable_prefix_caching=False),
    "vllm": dict(enable_chunked_prefill=False, scheduling_policy="fcfs", kv_reservation="on-demand",
                 preemption_mode="auto", enable_prefix_caching=False),
    "sarathi": dict(enable_chunked_prefill=True, max_num_batched_tokens=512, scheduling_policy="fcfs",
                    kv_reservation="on-demand", preemption_mode="auto", enable_prefix_caching=False),
    "sglang": dict(enable_chunked_prefill=True, scheduling_policy="cache-aware", kv_reservation="on-demand",
                   preemption_mode="recompute", enable_prefix_caching=True),
    "fastserve": dict(enable_chunked_prefill=False, scheduling_policy="mlfq", kv_reservation="on-demand",
                      preemption_mode="swap", async_recovery=True, enable_prefix_caching=False),
    # many replicas: the router places requests (kvflow/cluster); `replicas` is the user's choice
    "preble": dict(router="cache-aware", enable_chunked_prefill=True, scheduling_policy="cache-aware",
                   kv_reservation="on-demand", preemption_mode="recompute", enable_prefix_caching=True),
    # disaggregated prefill and decode (kvflow/disagg): one prefill and one decode worker unless told otherwise
    "distserve": dict(prefill_replicas=1, decode_replicas=1, kv_transfer="sync", router="min-queue",
                      pd_policy="least-load", enable_chunked_prefill=False, scheduling_policy="fcfs",
                      kv_reservation="on-demand"),
    "tetriinfer": dict(prefill_replicas=1, decode_replicas=1, kv_transfer="sync", router="least-load",
                       pd_policy="power-of-two", enable_chunked_prefill=True, scheduling_policy="fcfs",
                       kv_reservation="on-demand"),
    "splitwise": dict(prefill_replicas=1, decode_replicas=1, kv_transfer="async", router="min-queue",
                      pd_policy="min-queue", enable_chunked_prefill=True, scheduling_policy="fcfs",
                      kv_reservation="on-demand", preemption_mode="recompute"),
    "mooncake": dict(prefill_replicas=1, decode_replicas=1, kv_transfer="layerwise", router="min-ttft",
                     pd_policy="min-ttft", kv_pool=True, early_rejection=True, enable_chunked_prefill=True,
                     scheduling_policy="fcfs", kv_reservation="on-demand", enable_prefix_caching=True),
    # serverless on Ray Serve (kvflow/serverless)
    "deepflow": dict(serverless=True, router="cache-aware", enable_chunked_prefill=True, scheduling_policy="fcfs",
                     kv_reservation="on-demand", preemption_mode="recompute", enable_prefix_caching=True),
    "kvflow": dict(),
}


def preset_options(name: str) -> dict:
    """The options preset `name` sets; ValueError naming the field for an unknown one."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {name!r}")
    return dict(PRESETS[name])


def apply_preset(name: str | None, explicit: dict) -> dict:
    """The engine options: the preset's, then the explicit ones over them (logging what the preset set and
    what was overridden)."""
    if name is None:
        return dict(explicit)
    options = preset_options(name)
    overridden = sorted(k for k in options if k in explicit and explicit[k] != options[k])
    logger.info("preset %s: %s%s", name, describe(options) or "kvflow's defaults",
                f" (overridden: {', '.join(overridden)})" if overridden else "")
    return {**options, **explicit}


def describe(options: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items())
