"""A request as the engine core sees it: token ids, sampling parameters, progress and its KV blocks."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from kvflow.sampling.params import SamplingParams

if TYPE_CHECKING:
    from kvflow.memory.block_pool import Block


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self.value in ("stop", "length", "abort")


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    stop_ids: set[int]                 # token ids that end it: eos (unless ignore_eos) and stop_token_ids
    max_tokens: int                    # params.max_tokens clipped to the context left after the prompt
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0       # tokens whose K/V are in the cache
    block_table: list[Block] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    num_cached_blocks: int = 0         # leading full blocks registered in the prefix cache
    num_cached_tokens: int = -1        # prefix-cache hit when first scheduled (-1: not scheduled yet)
    num_preemptions: int = 0
    fork_of: str | None = None         # sample i > 0 of an n > 1 request: the id of sample 0, whose prompt
    fork_source: Request | None = None  # blocks it shares copy-on-write instead of recomputing (engine core)
    swapped_table: list[Block] = field(default_factory=list)   # its blocks in the swap tier while preempted
    generator: torch.Generator | None = None   # seeded requests draw from their own stream (engine makes it)
    # per output token: ([(id, logprob)] sampled first then the top-N, rank of the sampled token)
    logprobs: list[tuple[list[tuple[int, float]], int]] | None = None
    stop_reason: int | str | None = None
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    # prompt logprobs (params.prompt_logprobs): prompt tokens covered so far (the first one has none), and the
    # entries the last step computed, in the logprobs format above, until the engine core sends them
    num_prompt_logprobs: int = 1
    new_prompt_logprobs: list[tuple[list[tuple[int, float]], int]] | None = None

    def __post_init__(self):
        self.all_token_ids = list(self.prompt_token_ids)
        if self.params.logprobs is not None:
            self.logprobs = []

    @property
    def needs_prompt_logprobs(self) -> bool:
        """True while some prompt token's logprobs are still to be computed."""
        return self.params.prompt_logprobs is not None and self.num_prompt_logprobs < len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
