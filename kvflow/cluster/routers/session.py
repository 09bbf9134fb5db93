"""session: affinity by the OpenAI `user` field, so that a user's multi-turn conversation keeps finding its
history in one replica's prefix cache without a prefix index (sticky sessions, as in SGLang router's and
most load balancers' consistent routing, kept here as an explicit binding).

The first request of a user goes to the least-loaded healthy replica and binds the user to it. Later ones
follow the binding unless that replica is unhealthy, went down since (its cache is gone), or is overloaded
by SGLang router's balance rule (load > min + `balance_abs_threshold` and load > min *
`balance_rel_threshold`); then least load, and the user is rebound. Requests without a user: least load.

Options: balance_abs_threshold (requests, default 32), balance_rel_threshold (ratio, default 1.5),
max_sessions (users remembered, least recently seen forgotten first; default 100,000).
"""
from __future__ import annotations

from collections import OrderedDict

from kvflow.cluster.router import ROUTERS, ReplicaLoad, RouteRequest, Router
from kvflow.cluster.routers.least_load import DEFAULT_BALANCE_ABS, DEFAULT_BALANCE_REL, overloaded, scan


@ROUTERS.register("session")
class SessionRouter(Router):
    def __init__(self, num_replicas: int, balance_abs_threshold: float = DEFAULT_BALANCE_ABS,
                 balance_rel_threshold: float = DEFAULT_BALANCE_REL, max_sessions: int = 100_000, **options):
        super().__init__(num_replicas, **options)
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {max_sessions}")
        self.abs_threshold = float(balance_abs_threshold)
        self.rel_threshold = float(balance_rel_threshold)
        self.max_sessions = int(max_sessions)
        self.sessions: OrderedDict[str, tuple[int, int]] = OrderedDict()   # user -> (replica, its epoch)
        self._epoch: dict[int, int] = {}       # bumped when a replica goes down: older bindings are void
        self._cursor = 0

    def route(self, req: RouteRequest, loads: list[ReplicaLoad]) -> int:
        values, best, _ = scan(loads, self._cursor)
        user = req.user
        if user is not None:
            bound = self.sessions.get(user)
            if bound is not None:
                r, epoch = bound
                if (r < len(loads) and values[r] is not None and epoch == self._epoch.get(r, 0)
                        and not overloaded(values[r], values[best], self.abs_threshold, self.rel_threshold)):
                    self.sessions.move_to_end(user)
                    return loads[r].index
        self._cursor = best + 1
        if user is not None:
            self.sessions[user] = (best, self._epoch.get(best, 0))
            self.sessions.move_to_end(user)
            if len(self.sessions) > self.max_sessions:
                self.sessions.popitem(last=False)
        return loads[best].index

    def on_replica_down(self, replica: int) -> None:
        self._epoch[replica] = self._epoch.get(replica, 0) + 1

    def on_replica_up(self, replica: int) -> None:
        self._epoch[replica] = self._epoch.get(replica, 0) + 1
