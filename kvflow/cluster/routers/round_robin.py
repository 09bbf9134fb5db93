"""round-robin: the healthy replicas in turn, blind to load and cache. The baseline every other policy is
compared with; it spreads requests evenly when they all cost the same."""
from __future__ import annotations

from kvflow.cluster.router import ROUTERS, ReplicaLoad, RouteRequest, Router


@ROUTERS.register("round-robin")
class RoundRobinRouter(Router):
    def __init__(self, num_replicas: int, **options):
        super().__init__(num_replicas, **options)
        self._next = 0          # the position to try first next time

    def route(self, req: RouteRequest, loads: list[ReplicaLoad]) -> int:
        n = len(loads)
        start = self._next % n if n else 0
        for k in range(n):
            j = start + k
            if j >= n:
                j -= n
            if loads[j].healthy:
                self._next = j + 1
                return loads[j].index
        raise RuntimeError("no healthy replica")
