"""A request as the scheduler sees it: token ids, sampling parameters, progress, status and scheduling hints.

It owns no KV blocks (the KV-cache manager keeps block tables by request id) and no tensors (the model
runner keeps sampler state by request id). This module does not import torch.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from kvflow.predict.base import LengthEstimate
from kvflow.sampling.params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    WAITING_FOR_KV = "loading_kv"      # its prefix is being read from a KV tier (disk); others step on
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self.value in ("stop", "length", "abort")


@dataclass(eq=False, slots=True)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    stop_ids: set[int]                 # token ids that end it: eos (unless ignore_eos) and stop_token_ids
    max_tokens: int                    # params.max_tokens clipped to the context left after the prompt
    arrival_time: float = 0.0
    # scheduling hints
    fork_from: str | None = None       # share this request's prompt blocks (sample i > 0 of an n > 1 request)
    priority: int = 0                  # lower runs first (the `priority` policy)
    client: str | None = None          # who sent it (the OpenAI `user` field): the `fair` policy's unit
    length_estimate: LengthEstimate | None = None   # predicted output length (kvflow/predict)
    # tokens and progress
    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(default_factory=list)
    spec_token_ids: list[int] = field(default_factory=list)   # proposed, computed and verified next step
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0       # tokens whose K/V are in the cache
    num_cached_tokens: int = -1        # prefix-cache hit when first scheduled (-1: not scheduled yet)
    num_preemptions: int = 0
    num_prompt_logprobs: int = 1       # prompt tokens whose logprobs were sent (the first one has none)
    stop_reason: int | str | None = None
    first_scheduled_time: float | None = None
    finished_time: float | None = None

    def __post_init__(self):
        self.all_token_ids = list(self.prompt_token_ids)

    @property
    def needs_prompt_logprobs(self) -> bool:
        """True while some prompt token's logprobs are still to be computed."""
        return self.params.prompt_logprobs is not None and self.num_prompt_logprobs < len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        """Tokens known: the prompt and the accepted outputs (proposals not included)."""
        return len(self.all_token_ids)

    @property
    def num_tokens_with_spec(self) -> int:
        return len(self.all_token_ids) + len(self.spec_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def predicted_remaining(self) -> float:
        """Output tokens still to come, as predicted (max_tokens left when there is no prediction)."""
        left = self.max_tokens - len(self.output_token_ids)
        if self.length_estimate is None:
            return float(left)
        return min(self.length_estimate.remaining(len(self.output_token_ids), self.max_tokens), float(left))

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
