"""`Proposer`: what a draft method implements. The model runner calls it at the end of a step, for the
requests the scheduler asked to draft (`SchedulerOutput.num_draft_tokens`), and returns the drafts in
`RunnerOutput.draft_token_ids`; the scheduler puts them in the request's next step, to be verified.

A proposer here drafts deterministically (its most likely token), so the draft distribution is a point
mass and rejection sampling needs only the target's probabilities (kvflow/spec/rejection.py)."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from kvflow.spec.config import PROPOSERS, SpeculativeConfig


@dataclass
class DraftRequest:
    req_id: str
    token_ids: list[int]        # every token of the request so far (prompt, outputs, the one just sampled)
    num_tokens: int             # how many to draft at most


class Proposer(ABC):
    name = ""
    token_budget = 2048     # tokens a proposer's own model may compute per step (the engine sets its step budget)

    def __init__(self, config: SpeculativeConfig, runner):
        self.config, self.runner = config, runner

    @abstractmethod
    def propose(self, requests: list[DraftRequest]) -> list[list[int]]:
        """Drafts (possibly empty) for each request, in order."""

    def forget(self, req_id: str) -> None:
        """A request ended (proposers with per-request state drop it)."""

    def room(self, request: DraftRequest, table) -> int:
        """How many tokens a proposer that writes K/V may draft for `request`: its drafts go at positions
        L .. L + k - 2 (L its tokens), within its block table's lookahead slots and the rotary table."""
        L = len(request.token_ids)
        return min(request.num_tokens, len(table) * self.runner.block_size - L + 1,
                   self.runner.model.rotary.max_position - L + 1)


def make_proposer(config: SpeculativeConfig, runner) -> Proposer:
    return PROPOSERS.get(config.method)(config, runner)
