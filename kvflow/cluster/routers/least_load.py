"""least-load: the healthy replica with the smallest `ReplicaLoad.load` (requests in flight, KV usage as a
tie-breaker), ties broken in rotation so that an idle fleet is filled evenly rather than replica 0 first.
The classic "join the shortest queue".

Also the helpers the other policies share: `scan` (one pass over the loads: each healthy replica's load,
the least loaded with ties rotated from a cursor, the unhealthy ones as a bitmask) and `overloaded` (SGLang
router's balance rule: a replica is overloaded when its load exceeds the minimum both by an absolute
amount and by a ratio).
"""
from __future__ import annotations

from typing import Callable

from kvflow.cluster.router import ROUTERS, LoadTable, ReplicaLoad, RouteRequest, Router

DEFAULT_BALANCE_ABS = 32.0      # requests
DEFAULT_BALANCE_REL = 1.5       # ratio


def scan(loads: list[ReplicaLoad], start: int = 0,
         key: Callable[[ReplicaLoad], object] | None = None) -> tuple[list, int, int]:
    """(values, best, unhealthy): values[j] = key(loads[j]) (default: its `load`) for a healthy replica,
    None for an unhealthy one; best = the position of the smallest value, the first at or after `start`
    (cyclically) among equal ones; unhealthy = a bitmask of the unhealthy positions. RuntimeError when none
    is healthy. (Comprehensions and list methods rather than one Python loop: ~4x faster at 1,000.) With a
    LoadTable and the default key, its kept values are read, not recomputed (`values` is then the table's own
    list, which callers only read), and its `least` finds the best."""
    if key is None and isinstance(loads, LoadTable):
        values = loads.values
        if loads.num_unhealthy == len(values):
            raise RuntimeError("no healthy replica")
        return values, loads.least(start % len(values)), _mask(values) if loads.num_unhealthy else 0
    if key is None:
        values = [ld.load if ld.healthy else None for ld in loads]
    else:
        values = [key(ld) if ld.healthy else None for ld in loads]
    unhealthy = _mask(values) if None in values else 0
    if unhealthy == (1 << len(values)) - 1:        # (none healthy, or none at all)
        raise RuntimeError("no healthy replica")
    least = min(v for v in values if v is not None) if unhealthy else min(values)
    start = start % len(values)
    try:
        best = values.index(least, start)
    except ValueError:
        best = values.index(least, 0, start)
    return values, best, unhealthy


def _mask(values: list) -> int:
    """A bitmask of the positions whose value is None (the unhealthy replicas)."""
    mask = 0
    for j, v in enumerate(values):
        if v is None:
            mask |= 1 << j
    return mask


def overloaded(load: float, min_load: float, abs_threshold: float, rel_threshold: float) -> bool:
    """SGLang router's rule: more than `abs_threshold` above the least loaded and more than
    `rel_threshold` times it."""
    return load > min_load + abs_threshold and load > min_load * rel_threshold


@ROUTERS.register("least-load")
class LeastLoadRouter(Router):
    def __init__(self, num_replicas: int, **options):
        super().__init__(num_replicas, **options)
        self._cursor = 0        # where the tie-breaking rotation starts

    def route(self, req: RouteRequest, loads: list[ReplicaLoad]) -> int:
        _, best, _ = scan(loads, self._cursor)
        self._cursor = best + 1
        return loads[best].index
