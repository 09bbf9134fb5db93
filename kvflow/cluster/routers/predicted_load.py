"""predicted-load: the healthy replica with the least `ReplicaLoad.outstanding_tokens` (prompt tokens still
to prefill plus predicted output tokens still to decode), ties by `load`, then in rotation. Requests differ
in cost by orders of magnitude, so counting tokens rather than requests balances the work (the idea behind
TetriInfer's length-predicted decode placement). The client fills `outstanding_tokens` from the length
predictor, or from max_tokens when there is none.
"""
from __future__ import annotations

from kvflow.cluster.router import ROUTERS, ReplicaLoad, RouteRequest, Router
from kvflow.cluster.routers.least_load import scan


def _key(load: ReplicaLoad) -> tuple[float, float]:
    return (load.outstanding_tokens, load.load)


@ROUTERS.register("predicted-load")
class PredictedLoadRouter(Router):
    def __init__(self, num_replicas: int, **options):
        super().__init__(num_replicas, **options)
        self._cursor = 0

    def route(self, req: RouteRequest, loads: list[ReplicaLoad]) -> int:
        _, best, _ = scan(loads, self._cursor, _key)
        self._cursor = best + 1
        return loads[best].index
