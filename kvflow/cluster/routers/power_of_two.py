"""power-of-two: draw two distinct healthy replicas at random and send the request to the less loaded
(`ReplicaLoad.load`). Mitzenmacher's "power of two choices": nearly the balance of least-load at O(1) cost
and without every router herding onto the same stale minimum; TetriInfer's rand-2 decode placement.

Options: `seed` (int, default 0) seeds the `random.Random` the draws come from.
"""
from __future__ import annotations

import random

from kvflow.cluster.router import ROUTERS, ReplicaLoad, RouteRequest, Router

_TRIES = 8      # random draws before falling back to listing the healthy replicas


@ROUTERS.register("power-of-two")
class PowerOfTwoRouter(Router):
    def __init__(self, num_replicas: int, seed: int = 0, **options):
        super().__init__(num_replicas, **options)
        self.rng = random.Random(seed)

    def _draw(self, loads: list[ReplicaLoad], exclude: int) -> int:
        """A random healthy position other than `exclude` (-1 when there is none)."""
        n = len(loads)
        for _ in range(_TRIES):        # O(1) while most replicas are healthy
            j = self.rng.randrange(n)
            if j != exclude and loads[j].healthy:
                return j
        healthy = [j for j in range(n) if j != exclude and loads[j].healthy]
        return self.rng.choice(healthy) if healthy else -1

    def route(self, req: RouteRequest, loads: list[ReplicaLoad]) -> int:
        a = self._draw(loads, -1)
        if a < 0:
            raise RuntimeError("no healthy replica")
        b = self._draw(loads, a)
        if b >= 0 and loads[b].load < loads[a].load:
            a = b
        return loads[a].index
