"""Serverless serving in the simulator: the autoscaler the discrete-event loop (kvflow/sim/cluster.py's
Simulation, which this class is a base of) runs on its clock.

Slots for up to `max_replicas`; every AUTOSCALE_S the autoscaler wants ceil(in flight /
target_ongoing_requests) replicas (within min/max). A start takes the profile's cold_start_s, or
WARM_FRACTION of it while a warm-pool process is free (the pool refills after cold_start_s). Idle replicas
stop after scale_down_idle_s; requests wait at the front door while none is ready, and fail after
scale_up_timeout_s. A deliberately simple model of Ray Serve's autoscaler (kvflow/serverless runs the real one).
"""
from __future__ import annotations

import math


AUTOSCALE_S = 1.0
WARM_FRACTION = 0.25
TICK, READY, WARM = range(3, 6)      # the loop's event kinds (after cluster.py's ARRIVE, STEP_END, KV_ARRIVE)


class Autoscaler:
    """The serverless events of a Simulation: a replica's start (READY after its cold start), the autoscaler's
    TICK, a warm-pool process coming back (WARM). Uses the Simulation's pool, clock, events and recorder."""

    def _start_replica(self, i: int, delay: float) -> None:
        self.prefill.replicas[i] = self._new_replica(i)
        self.starting += 1
        if delay <= 0:
            self._ready(i)
        else:
            self._push(self.now + delay, READY, i)

    def _ready(self, i: int) -> None:
        self.starting -= 1
        self.prefill.set_ready(i, True)
        r = self.prefill.replicas[i]
        r.started_s = r.idle_since = self.now
        self.rec.replica_up(i, self.now)
        if self.prefill.router is not None:
            self.prefill.router.on_replica_up(i)
        front, self.front = self.front, []
        for rec in front:
            self._route(rec)

    def _tick(self) -> None:
        so, pool = self.config.serverless, self.prefill
        for rec in [x for x in self.front if self.now - x.arrival > so.scale_up_timeout_s]:
            self.front.remove(rec)
            self.rec.fail(rec, "no replica started within scale_up_timeout_s (503)")
        in_flight = self.rec.in_flight
        want = min(max(math.ceil(in_flight / so.target_ongoing_requests), so.min_replicas), so.max_replicas)
        alive = sum(1 for r in pool.replicas if r is not None)
        for i in range(len(pool.replicas)):
            if alive >= want:
                break
            if pool.replicas[i] is None:
                warm = self.warm_free > 0
                if warm:
                    self.warm_free -= 1
                    self._push(self.now + self.profile.cold_start_s, WARM)   # the pool refills
                self._start_replica(i, self.profile.cold_start_s * (WARM_FRACTION if warm else 1.0))
                alive += 1
        ready = sum(pool.ready)
        for i, r in enumerate(pool.replicas):
            if (ready > want and r is not None and pool.ready[i] and not r.busy and not r.has_work()
                    and self.now - r.idle_since >= so.scale_down_idle_s):
                r.check()
                self.rec.replica_down(i, self.now)
                pool.set_ready(i, False)
                pool.replicas[i] = None
                pool.router.on_replica_down(i)
                ready -= 1
        if self._events or self.front or in_flight or not self._arrivals_done:
            self._push(self.now + AUTOSCALE_S, TICK)
        else:
            for i, r in enumerate(pool.replicas):        # the end: everything still up goes down now
                if r is not None and pool.ready[i]:
                    self.rec.replica_down(i, self.now)
