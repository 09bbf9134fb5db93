"""What crosses between the frontend and the engine core, and the codec for every plain-data type.

The wire types are dataclasses with named fields; `encode` / `decode` turn any of them (and the step
contract of kvflow.step, nested at will) into msgpack bytes and back: each dataclass travels as a map of
its fields plus its type name, never as a pickle, and a reader that gets a new field it does not know
fails loudly instead of shifting positions. This module imports neither torch nor the model stack.

Messages (lists whose first item is the kind):
  frontend -> core:  ["add", EngineCoreRequest] | ["abort", [ids], finish reason] | ["reset_prefix_cache"]
                     | ["shutdown"]
  core -> frontend:  ["ready", {"num_kv_blocks", "pid"}] | ["outputs", [EngineCoreOutput], EngineStats]
                     | ["error", request id, message] | ["dead", message]
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import msgpack

from kvflow import step
from kvflow.sampling.params import SamplingParams
from kvflow.structured.params import StructuredOutputsParams


@dataclass(slots=True)
class EngineCoreRequest:
    """A request as the frontend hands it to the engine core (one per sample of an n > 1 request)."""
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    stop_ids: list[int]                # eos (unless ignore_eos) and stop_token_ids
    max_tokens: int                    # clipped to the context left after the prompt
    arrival_time: float
    fork_from: str | None = None       # share this request's prompt blocks (the samples of n > 1)
    priority: int = 0                  # lower runs first, under the `priority` policy
    client: str | None = None          # the OpenAI `user` field: the `fair` policy's unit
    # output tokens it already has, produced elsewhere (another replica that died, or that it moved from):
    # computed again with the prompt, or found in the prefix cache, and never sent again
    output_token_ids: list[int] = dataclasses.field(default_factory=list)


@dataclass(slots=True)
class EngineCoreOutput:
    request_id: str
    new_token_ids: list[int]
    new_logprobs: list | None = None     # per new token: ([(id, logprob)] sampled first, then top-N; rank)
    finish_reason: str | None = None     # "stop" | "length" | "abort"
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    first_scheduled_time: float | None = None
    num_preemptions: int = 0
    # prompt logprobs computed this step (a prompt chunk may send them with no new token), in the
    # new_logprobs format, one entry per prompt token from the second on
    prompt_logprobs: list | None = None


@dataclass(slots=True)
class EngineStats:
    """A snapshot of the core's load, sent to the frontend with every step (Prometheus gauges)."""
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0          # fraction of KV blocks held by requests
    prefix_cache_queries: int = 0        # prompt tokens looked up in the prefix cache, cumulative
    prefix_cache_hits: int = 0
    num_preemptions: int = 0             # cumulative
    num_swapped_out: int = 0             # of those, preempted by swapping out (the rest: recompute)
    num_cow_copies: int = 0              # blocks copied on write by forked samples, cumulative
    disk_hit_tokens: int = 0             # prompt tokens loaded from the disk tier, cumulative
    queue_lengths: dict = dataclasses.field(default_factory=dict)   # the policy's queues (MLFQ levels): length
    predictor_error: float | None = None  # the length predictor's running mean |log2(predicted / true)|
    token_budget: int = 0                # the last step's token budget (it follows --tpot-slo-ms when set)
    spec_drafts: int = 0                 # speculative decoding, cumulative: draft tokens verified,
    spec_accepted: int = 0               # ... of them accepted,
    spec_verifications: int = 0          # ... in this many verifications
    prefill_tokens_per_s: float = 0.0    # the prefill rate the core measures (its preemption cost model's)


WIRE_TYPES = {cls.__name__: cls for cls in (
    EngineCoreRequest, EngineCoreOutput, EngineStats, SamplingParams, StructuredOutputsParams,
    step.BlockOp, step.NewRequestData, step.SchedulerOutput, step.RunnerOutput)}
_FIELDS = {cls: tuple(f.name for f in dataclasses.fields(cls)) for cls in WIRE_TYPES.values()}
_TYPE_KEY = "__type__"


def _default(obj):
    names = _FIELDS.get(type(obj))
    if names is not None:
        d = {name: getattr(obj, name) for name in names}
        d[_TYPE_KEY] = type(obj).__name__
        return d
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"cannot send {type(obj).__name__} over the wire")


def _object_hook(d: dict):
    name = d.pop(_TYPE_KEY, None)
    if name is None:
        return d
    cls = WIRE_TYPES.get(name)
    if cls is None:
        raise ValueError(f"unknown wire type {name!r}")
    return cls(**d)


def encode(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True, default=_default)


def decode(data: bytes):
    return msgpack.unpackb(data, raw=False, strict_map_key=False, object_hook=_object_hook)
