"""The discrete-event loop: arrivals, routing (kvflow's real router policies), replica steps, the prefill ->
decode hand-off; the serverless autoscaler's events are kvflow/sim/serverless.py's.

Shapes, as EngineConfig chooses them (a preset or flags):
  replicas      `replicas` engines behind `router` (one: no router)
  P/D           `prefill_replicas` + `decode_replicas`, each its own Scheduler + KVCacheManager. A request
                is routed to a prefill worker by `router` and computes its prompt there (max_tokens 1: the
                first token comes from the prefill worker, as in DistServe); its KV then moves to a decode
                worker chosen by `pd_policy` (sync: after the prefill; async/layerwise: with the prefill worker).
                Exposed transfer time (bytes / the profile's link bandwidth): sync, the whole prompt's KV;
                async, the last prefill chunk's share; layerwise, one layer's share. On arrival the decode worker
                adopts the blocks into its prefix cache (as kvflow/cluster/kv_transfer.import_blocks: at most
                half its free blocks), so decode workers always run with the prefix cache on.
                Mooncake's `early_rejection` refuses a request before any work, and its `kv_pool` shares
                prompt blocks between prefill workers: kvflow/sim/pd.py.
  serverless    slots for up to `max_replicas`, started and stopped by a simple model of Ray Serve's
                autoscaler: kvflow/sim/serverless.py.
Same seed and inputs, same events in the same order: the result is deterministic.
"""
from __future__ import annotations

import contextlib
import gc
import heapq
import math
from dataclasses import dataclass, field

from kvflow.cluster.router import ROUTERS, LoadTable, ReplicaLoad, RouteRequest, make_router
from kvflow.config import EngineConfig
from kvflow.memory.kv_cache_manager import extend_block_hashes
from kvflow.sim.cost_model import CostModel, HardwareProfile, SharedMachine, replica_cost
from kvflow.sim.features import learned_predictor, prompt_features
from kvflow.sim.pd import EarlyRejection, ElasticRoles, KVPool, put_pool, read_pool
from kvflow.sim.replica import SimReplica, engine_spec
from kvflow.sim.runner import DEFAULT_ACCEPTANCE
from kvflow.sim.serverless import READY, TICK, Autoscaler
from kvflow.sim.report import Record, Recorder

ARRIVE, STEP_END, KV_ARRIVE = range(3)       # (the autoscaler's: serverless.TICK, READY, WARM)
ARRIVE_FIRST = 1 << 62     # an arrival's place in the queue: before every other event of its instant


@dataclass
class Pool:
    """Replicas of one role, and the router that places requests on them."""
    replicas: list[SimReplica | None]
    router: object | None
    ready: list[bool] = field(default_factory=list)

    def __post_init__(self):
        # kept, not rebuilt per route; each replica tells the table when its load changes
        self.loads = LoadTable(r.load if r is not None else ReplicaLoad(i, healthy=False)
                               for i, r in enumerate(self.replicas))
        for r in self.replicas:
            if r is not None:
                r.loads = self.loads

    def set_ready(self, i: int, ready: bool) -> None:
        """A replica (serverless) came up or went away: the router sees it healthy or not."""
        self.ready[i] = ready
        r = self.replicas[i]
        if r is not None:
            r.loads = self.loads if ready else None
        self.loads[i] = r.load if ready and r is not None else ReplicaLoad(i, healthy=False)

    def choose(self, req: RouteRequest) -> int:
        if len(self.replicas) == 1:
            return 0
        return self.router.route(req, self.loads)


class Simulation(Autoscaler):
    def __init__(self, config: EngineConfig, profile: HardwareProfile, track_tables: bool = False,
                 keep_itl: int = 20000, bin_s: float | None = None, step_noise: float = 0.0,
                 spec_acceptance: float | list[float] | None = None,
                 spec_propose_rate: float | list[float] | None = None):
        """`step_noise`: sigma of a log-normal factor on every step's time (cost_model.Jittered; each replica
        draws from its own generator, seeded by the config's seed and its index); 0: the profile's times.
        `spec_acceptance`: with speculative decoding, each draft token's chance to be accepted, or one per draft
        position (runner.py; None: the profile's measured one, else DEFAULT_ACCEPTANCE); `spec_propose_rate`: the
        chance that a request asked to draft gets drafts, or the requests' own (None: the profile's measured one,
        else 1)."""
        if not step_noise >= 0:
            raise ValueError(f"step_noise must be a non-negative number, got {step_noise!r}")
        self.config, self.profile, self.step_noise = config, profile, step_noise
        self.spec_acceptance = next(a for a in (spec_acceptance, profile.spec_acceptance, DEFAULT_ACCEPTANCE)
                                    if a is not None)
        self.spec_propose_rate = next(a for a in (spec_propose_rate, profile.spec_propose_rate, 1.0) if a is not None)
        self.spec = engine_spec(config, profile)
        self.predictor = learned_predictor(config)     # a length predictor file, and the model's features it reads
        self.features = (prompt_features(config, self.predictor.features)
                         if self.predictor is not None and self.predictor.features else None)
        self.cost = profile.cost_model()
        self.track_tables = track_tables
        self.now = 0.0
        self._events: list = []
        self._seq = 0
        self.rec = Recorder(keep_itl, bin_s)
        self.pd = config.disagg.enabled
        self.serverless = config.serverless.serverless
        self.front: list[Record] = []              # serverless: requests waiting for a ready replica
        self._arrivals_done = False
        self.kv_pool: KVPool | None = None           # P/D: the shared KV pool (kv_pool)
        self.admission: EarlyRejection | None = None  # P/D: early_rejection
        self.stalls: dict[int, float] = {}      # replica index -> seconds its next step waits (KV pool read, put)
        self.prefilling: set[str] = set()           # P/D: requests in their prefill phase (hand off when it ends)
        self.elastic: ElasticRoles | None = None     # P/D: pd_elastic
        self.machines: dict[int, SharedMachine] = {}   # replicas sharing a machine (replica_cost)
        bs = self.spec.block_size
        router_opts = dict(block_size=bs, seed=config.model.seed)
        # replicas measure the load extras only where a router or the elastic P/D rule reads them
        routers = [config.cluster.router] + ([config.disagg.pd_policy] if self.pd else [])
        self.reports_extra = (self.pd and config.disagg.pd_elastic) or any(ROUTERS.get(name).load_extras
                                                                          for name in routers)
        if self.pd:
            p, d = config.disagg.prefill_replicas, config.disagg.decode_replicas
            if config.disagg.pd_elastic:     # every worker in both pools, routable in its role's only
                self.prefill = self._pool(p + d, config.cluster.router, router_opts, prefix_caching=True)
                self.decode = Pool(self.prefill.replicas, make_router(config.disagg.pd_policy, p + d, **router_opts),
                                   [True] * (p + d))
                self.elastic = ElasticRoles(self.prefill, self.decode, p, config.scheduler)
            else:
                self.prefill = self._pool(p, config.cluster.router, router_opts)
                self.decode = self._pool(d, config.disagg.pd_policy, router_opts, prefix_caching=True, base=p)
            per_block = self.cost.transfer_seconds(self.spec.block_bytes)
            for r in self.prefill.replicas:
                r.load.extra["transfer_s_per_block"] = per_block
            if config.disagg.kv_pool:
                self.kv_pool = KVPool(config.disagg.kv_pool_bytes // self.spec.block_bytes)
            if config.disagg.early_rejection:
                self.admission = EarlyRejection(bs, config.scheduler.length_predictor)
        elif self.serverless:
            so = config.serverless
            self.prefill = Pool([None] * so.max_replicas, make_router(config.cluster.router, so.max_replicas,
                                                                     **router_opts), [False] * so.max_replicas)
            self.decode = None
            self.warm_free, self.starting = so.warm_pool, 0
            for i in range(so.min_replicas):
                self._start_replica(i, 0.0)
            self._push(0.0, TICK)
        else:
            self.prefill = self._pool(config.cluster.replicas, config.cluster.router, router_opts)
            self.decode = None

    def _pool(self, n, router, opts, prefix_caching=None, base=0) -> Pool:
        reps = [self._new_replica(base + i, prefix_caching) for i in range(n)]
        for i, r in enumerate(reps):
            r.load.index = i
            r.role = ("decode" if base else "prefill") if self.pd else "mixed"
            self.rec.replica_up(r.index, 0.0)
        return Pool(reps, make_router(router, n, **opts) if n > 1 else None, [True] * n)

    def _new_replica(self, index: int, prefix_caching: bool | None = None) -> SimReplica:
        return SimReplica(index, self.spec, self._cost(index), self.clock, prefix_caching, self.track_tables,
                          self.spec_acceptance, self.reports_extra, self.predictor, self.spec_propose_rate)

    def _features(self, rec: Record) -> dict | None:
        """What the learned length predictor reads of the request's prompt (None: no such predictor)."""
        return self.features(rec.prompt) if self.features is not None else None

    def _cost(self, index: int) -> CostModel:
        return replica_cost(self.cost, index, self.clock, self.machines, self.step_noise, self.config.model.seed)

    def clock(self) -> float:
        return self.now

    def _push(self, t: float, kind: int, a=None, b=None) -> None:
        self._seq += 1
        heapq.heappush(self._events, (t, self._seq, kind, a, b))

    def _push_arrival(self, t: float, a, b=None) -> None:
        """An ARRIVE event, before every other event of its instant (arrivals among themselves in order): a step
        starting then sees every request that arrived then, as the real engine adds what its queue holds before
        it schedules (the workload is read one arrival ahead: a burst's later ones are pushed after the step
        its first one kicked)."""
        self._seq += 1
        heapq.heappush(self._events, (t, self._seq - ARRIVE_FIRST, ARRIVE, a, b))

    # ---- the loop ------------------------------------------------------------------------------------------

    def run(self, requests) -> Recorder:
        with without_cyclic_gc():
            return self._run(requests)

    def _run(self, requests) -> Recorder:
        self._arrivals = iter(requests)
        self._next_arrival()
        self.advance(math.inf)
        for r in self.replicas():
            if not self.serverless:
                self.rec.replica_down(r.index, self.now)
        self.rec.finish(self.now)
        return self.rec

    def advance(self, until: float) -> None:
        """Run the events before time `until`. An ARRIVE event's `b` is None for a request of the workload
        (it is routed here), or the replica a parallel run's router chose for it (kvflow/sim/parallel.py)."""
        events = self._events
        while events and events[0][0] < until:
            t, _, kind, a, b = heapq.heappop(events)
            self.now = t
            if kind == STEP_END:            # (the most frequent first)
                self._step_end(a, b)
            elif kind == ARRIVE:
                if b is None:
                    self._next_arrival()
                    self._arrive(a)
                else:
                    self._route(a, *b)
            elif kind == KV_ARRIVE:
                self._kv_arrive(a, b)
            elif kind == TICK:
                self._tick()
            elif kind == READY:
                self._ready(a)
            else:
                self.warm_free += 1

    def replicas(self) -> list[SimReplica]:
        shared = self.decode is not None and self.decode.replicas is self.prefill.replicas    # (pd_elastic)
        pools = [self.prefill] + ([self.decode] if self.decode and not shared else [])
        return [r for p in pools for r in p.replicas if r is not None]

    def _next_arrival(self) -> None:
        req = next(self._arrivals, None)
        if req is not None:
            self._push_arrival(req.arrival_s, req)
        else:
            self._arrivals_done = True

    def _arrive(self, sreq) -> None:
        rec = self.rec.add(sreq, self.spec.max_model_len)
        if rec.error:
            return
        if self.serverless and not any(self.prefill.ready):
            self.front.append(rec)
            return
        self._route(rec)

    def _route(self, rec: Record, i: int | None = None, hashes: list[int] | None = None) -> None:
        """Place a request: on replica `i` with its prompt's block `hashes` when a parallel run's router chose
        it already, else where this pool's router says."""
        if i is None:
            hashes = extend_block_hashes([], rec.prompt, self.spec.block_size)
            route = RouteRequest(rec.rid, hashes, len(rec.prompt), rec.max_tokens, rec.user)
            if self.admission is not None:      # the decode workers' blocks (those in that role, when elastic)
                capacity = sum(d.load.num_kv_blocks for d, up in zip(self.decode.replicas, self.decode.ready) if up)
                why = self.admission.admit(rec.rid, len(rec.prompt), rec.max_tokens, rec.user, capacity)
                if why:
                    self.rec.fail(rec, why)
                    return
            i = self.prefill.choose(route)
            if self.pd and self.config.disagg.kv_transfer != "sync":     # (a parallel run has no P/D)
                rec.decode = self.decode.choose(route)
                d = self.decode.replicas[rec.decode]
                d.load.num_assigned += 1
                d.load_changed()
        rec.replica = i
        r = self.prefill.replicas[i]
        if self.pd:
            self.prefilling.add(rec.rid)
        if self.kv_pool is not None:       # the worker's next step waits for the read
            self._stall(r, read_pool(self.kv_pool, r.kv, hashes, self.now, self.cost, self.spec.block_bytes))
        r.kv.set_hashes(rec.rid, hashes)    # the engine extends the same chain: no need to hash twice
        r.add(rec.rid, rec.prompt, 1 if self.pd else rec.max_tokens, rec.arrival, rec.user,
              features=self._features(rec))
        r.load.outstanding_tokens += len(rec.prompt) + rec.max_tokens
        r.load_changed()
        self._kick(r)

    def _kick(self, r: SimReplica) -> None:
        if not r.busy:
            r.busy = True                  # a step starts at this instant, after same-time events queued before
            self._push(self.now, STEP_END, r, True)

    def _step_end(self, r: SimReplica, start: bool | None = None) -> None:
        if not start:
            _, outputs = r.end_step()
            self._outputs(r, outputs)
            if self.elastic is not None:
                self.elastic.check(self.now)
        r.busy = False
        if self.stalls and r.index in self.stalls:     # its loop reads from or puts to the KV pool first
            r.busy = True
            self._push(self.now + self.stalls.pop(r.index), STEP_END, r, True)
            return
        if r.has_work():
            seconds = r.begin_step()
            if seconds is not None:
                self.rec.busy(r.index, self.now, seconds, r.load.kv_cache_usage, len(r.scheduler.running))
                self._push(self.now + seconds, STEP_END, r)
                return
            wake = r.wake_at()
            if wake is not None:       # its requests wait on disk-tier reads: it steps again when one is in
                r.busy = True
                self._push(wake, STEP_END, r, True)
                return
        r.idle_since = self.now

    def _outputs(self, r: SimReplica, outputs) -> None:
        for rec, o in self.rec.outputs(outputs, self.now):       # the requests these outputs end
            prefill_side = self.pd and rec.rid in self.prefilling      # (its phase, whatever r's role is now)
            self.prefilling.discard(rec.rid)
            pool = self.prefill if (prefill_side or not self.pd) else self.decode
            r.finished(0.0)
            if pool.router is not None:
                pool.router.on_finished(rec.rid, r.load.index)
            if prefill_side and rec.max_tokens > 1:
                self._hand_off(r, rec, o.new_token_ids)
            else:
                self.rec.done(rec, self.now)
                if self.admission is not None:
                    self.admission.forget(rec.rid)

    # ---- prefill -> decode ----------------------------------------------------------------------------------

    def _hand_off(self, r: SimReplica, rec: Record, first: list[int]) -> None:
        mode = self.config.disagg.kv_transfer
        full = self.cost.transfer_seconds(len(rec.prompt) * self.profile.kv_bytes_per_token)
        hashes = extend_block_hashes([], rec.prompt, self.spec.block_size) if mode == "sync" or self.kv_pool else None
        put_s = 0.0
        if self.kv_pool is not None:          # (the worker's next step and this hand-off wait for the copy)
            put_s = put_pool(self.kv_pool, r.index, hashes, self.now, self.cost, self.spec.block_bytes)
            self._stall(r, put_s)
        if mode == "sync":
            rec.decode = self.decode.choose(RouteRequest(rec.rid, hashes, len(rec.prompt), rec.max_tokens, rec.user))
            d = self.decode.replicas[rec.decode]
            d.load.num_assigned += 1
            d.load_changed()
            exposed = full
        elif mode == "async":
            chunk = r.runner.last_chunk.get(rec.rid, len(rec.prompt))
            exposed = full * chunk / len(rec.prompt)
        else:
            exposed = full / self.profile.model["num_layers"]
        rec.transfer_s = exposed
        self._push(self.now + put_s + exposed, KV_ARRIVE, rec, list(first))

    def _stall(self, r: SimReplica, seconds: float) -> None:
        if seconds:
            self.stalls[r.index] = self.stalls.get(r.index, 0.0) + seconds

    def _kv_arrive(self, rec: Record, first: list[int]) -> None:
        d = self.decode.replicas[rec.decode]
        d.load.num_assigned -= 1                 # add() counts it again
        hashes = extend_block_hashes([], rec.prompt, self.spec.block_size)
        d.kv.adopt_blocks(hashes, d.kv.pool.num_free // 2)
        d.add(rec.rid, rec.prompt, rec.max_tokens, rec.arrival, rec.user, outputs=first, features=self._features(rec))
        d.load.outstanding_tokens += rec.max_tokens
        d.load_changed()
        self._kick(d)


@contextlib.contextmanager
def without_cyclic_gc():
    """The event loop allocates millions of small objects, and reference counting frees every one: it makes
    no reference cycles (tests/test_sim.py: a gc.collect() after a run finds nothing to free). The cyclic
    collector would only rescan the live set, which grows with the run (finished rows, every replica's KV
    blocks), through memory long out of the caches: with its default thresholds a quarter of the time at
    1,000 replicas, and 3% still with rare passes. So it is off while a run goes, and as it was after."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def simulate(config: EngineConfig, profile: HardwareProfile, requests, **kw) -> tuple[Simulation, Recorder]:
    sim = Simulation(config, profile, **kw)
    return sim, sim.run(requests)
