"""`fair`: the virtual token counter (VTC, Sheng et al. 2024), so that one flooding client cannot starve the
others. Each client (the OpenAI `user` field; requests without one share the client None) has a counter of
the service it received: prompt tokens computed count PROMPT_WEIGHT each and generated tokens OUTPUT_WEIGHT,
divided by the client's share (`client_weights`, default 1). The waiting request of the client with the
smallest counter goes first. A client that comes back after having nothing queued has its counter lifted
to the smallest counter among the clients with requests in the system, less MARGIN: idling banks no
credit beyond one margin, and that margin lets its request take the next batch seat at once. A waiting
request takes the seat of a running one whose client is ahead by more than MARGIN tokens."""
from __future__ import annotations

from collections import defaultdict

from kvflow.request import Request
from kvflow.scheduler.policy import RankedPolicy, register_policy

PROMPT_WEIGHT = 1.0
OUTPUT_WEIGHT = 2.0
MARGIN = 64.0


def parse_client_weights(spec: str | None) -> dict[str, float]:
    """'alice=2,bob=1' -> {"alice": 2.0, "bob": 1.0}; ValueError naming client_weights."""
    weights: dict[str, float] = {}
    for part in (spec or "").split(","):
        if not part.strip():
            continue
        name, sep, value = part.rpartition("=")
        try:
            w = float(value)
        except ValueError:
            w = -1.0
        if not sep or not name.strip() or not 0 < w < float("inf"):
            raise ValueError(f"client_weights must look like 'alice=2,bob=1' with positive weights, got {spec!r}")
        weights[name.strip()] = w
    return weights


@register_policy("fair")
class Fair(RankedPolicy):
    OPTIONS = ("client_weights",)
    margin = MARGIN

    def __init__(self, client_weights: str | dict | None = None):
        self.weights = client_weights if isinstance(client_weights, dict) else parse_client_weights(client_weights)
        self.counters: dict[str | None, float] = defaultdict(float)
        self.live: dict[str | None, int] = defaultdict(int)     # requests in the system, per client

    def on_add(self, req: Request, now: float) -> None:
        c = req.client
        if self.live[c] == 0:
            active = [self.counters[k] for k, n in self.live.items() if n > 0]
            if active:
                self.counters[c] = max(self.counters[c], min(active) - self.margin)
        self.live[c] += 1

    def on_computed(self, req: Request, num_prompt_tokens: int, num_output_tokens: int, now: float) -> None:
        service = PROMPT_WEIGHT * num_prompt_tokens + OUTPUT_WEIGHT * num_output_tokens
        self.counters[req.client] += service / self.weights.get(req.client or "", 1.0)

    def on_finish(self, req: Request) -> None:
        self.live[req.client] -= 1

    def rank(self, req: Request, now: float) -> tuple:
        return self.counters[req.client], req.arrival_time

    def outranks(self, waiting: Request, running: Request, now: float) -> bool:
        return self.counters[waiting.client] < self.counters[running.client] - self.margin
