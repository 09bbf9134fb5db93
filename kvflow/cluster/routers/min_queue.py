"""min-queue: the healthy replica with the least queued work, counted in prompt tokens still to prefill and
in requests waiting (DistServe's and SplitWise's "min queue" placement of prefills): a replica with one
long prompt queued is busier than one with two short ones. Ties rotate, as in least-load."""
from __future__ import annotations

from kvflow.cluster.router import ROUTERS, ReplicaLoad, RouteRequest, Router
from kvflow.cluster.routers.least_load import scan


def queued(load: ReplicaLoad) -> tuple[float, float]:
    return (load.extra.get("queued_prefill_tokens", load.num_waiting), load.load)


@ROUTERS.register("min-queue")
class MinQueueRouter(Router):
    load_extras = ("queued_prefill_tokens",)

    def __init__(self, num_replicas: int, **options):
        super().__init__(num_replicas, **options)
        self._cursor = 0

    def route(self, req: RouteRequest, loads: list[ReplicaLoad]) -> int:
        _, best, _ = scan(loads, self._cursor, key=queued)
        self._cursor = best + 1
        return loads[best].index
