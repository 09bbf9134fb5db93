"""ClusterClient: the engine-core client of many replicas (Ray actors, kvflow/cluster/replica.py).

It speaks the same interface as the single-core clients (kvflow/engine/core_client.py), so AsyncLLM and
LLMEngine run unchanged on top of it, and adds what many replicas need:
  routing     each new request goes where the router (kvflow/cluster/router.py) says; the samples of an
              n > 1 request and the beams of a beam search follow the request they fork from
  tracking    for every request in flight: its replica and every token it produced, so that
  faults      when a replica dies (its actor killed, its process gone, its core failed), each of its
              requests resumes on another replica from the tokens already sent (prompt and outputs computed
              again): the client sees neither an error nor repeated text. Ray restarts the actor; the router
              takes it back once it answers `ready` again
  migration   `migrate(id, dst)` moves a running request with its KV blocks (migration.py, kv_transfer.py)
Everything runs on one thread (the caller's loop); Ray does the waiting: one long `poll` per replica is
always in flight, and every other call answers through the same wait set (`_collect`).
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import deque

from kvflow.cluster.fleet import Replica, aggregate, block_hashes, frontend_predictor, start_replicas
from kvflow.cluster.migration import Migration
from kvflow.cluster.router import ReplicaLoad, RouteRequest, make_router
from kvflow.config import ResolvedConfig
from kvflow.engine.core_client import EngineCoreClient, EngineDeadError
from kvflow.engine.wire import EngineCoreOutput, EngineCoreRequest
from kvflow.request import RequestStatus

logger = logging.getLogger("kvflow")

POLL_S = 0.5


@dataclasses.dataclass
class _Tracked:
    req: EngineCoreRequest
    replica: int
    tokens: list[int] = dataclasses.field(default_factory=list)
    migrating: bool = False
    predicted: float | None = None       # output tokens the frontend's length predictor expects


class ClusterClient(Migration, EngineCoreClient):
    def __init__(self, rc: ResolvedConfig):
        import ray
        self._ray = ray
        self.rc, self.opts = rc, rc.config.cluster
        self.replicas: list[Replica] = self._start_replicas(rc)
        self.router = make_router(self.opts.router, len(self.replicas), block_size=rc.config.cache.block_size)
        self.predictor = frontend_predictor(rc)
        self.requests: dict[str, _Tracked] = {}
        self.parked: list[EngineCoreRequest] = []      # no healthy replica: they wait for one
        self.pending: dict = {}                        # ObjectRef -> (kind, replica index, incarnation, data)
        self.buffer: deque = deque()                   # messages for the caller, in the engine-core format
        self.num_resumed = self.num_migrations = self.num_failed_migrations = 0
        self.num_routed, self.route_seconds = 0, 0.0     # the router's own cost (hashing the prompt included)
        self.routes: deque = deque(maxlen=64)          # (time, request id, replica): the router's recent choices
        self.dead: str | None = None

    # ---- start ------------------------------------------------------------------------------------------

    def _start_replicas(self, rc: ResolvedConfig) -> list[Replica]:
        return start_replicas(rc)

    def _ready(self, r: Replica, info: dict) -> None:
        r.up(info)
        self.router.on_replica_up(r.index)
        self._poll(r)
        parked, self.parked = self.parked, []
        for req in parked:
            self._place(req)

    async def wait_ready(self, timeout: float) -> dict:
        """Wait until every replica has loaded the model."""
        refs = [r.actor.ready.remote() for r in self.replicas]
        try:
            infos = await asyncio.wait_for(asyncio.gather(*refs), timeout)
        except Exception as e:
            raise EngineDeadError(f"the replicas did not start: {e}") from None
        return self._started(infos)

    def wait_ready_sync(self, timeout: float) -> dict:
        try:
            infos = self._ray.get([r.actor.ready.remote() for r in self.replicas], timeout=timeout)
        except Exception as e:
            raise EngineDeadError(f"the replicas did not start: {e}") from None
        return self._started(infos)

    def _started(self, infos: list[dict]) -> dict:
        for r, info in zip(self.replicas, infos):
            self._ready(r, info)
        logger.info("%d replicas ready: %s", len(infos), ", ".join(
            f"#{i['index']} pid {i['pid']} cores {i['cores']} ({i['load_s']:.1f}s)" for i in infos))
        return {"num_kv_blocks": sum(i["num_kv_blocks"] for i in infos), "replicas": infos}

    # ---- requests -----------------------------------------------------------------------------------------

    def add_request(self, req: EngineCoreRequest) -> None:
        self._place(req)

    def _place(self, req: EngineCoreRequest) -> None:
        parent = self.requests.get(req.fork_from) if req.fork_from else None
        if parent is not None and self.replicas[parent.replica].healthy:
            index = parent.replica
        else:
            healthy = [r for r in self.replicas if r.healthy]
            if not healthy:
                self.parked.append(req)
                self.requests.pop(req.request_id, None)
                return
            if req.fork_from is not None:          # its parent is gone: it computes its own prompt
                req = dataclasses.replace(req, fork_from=None)
            t0 = time.perf_counter()
            route = self._route_request(req)
            index = self._route(route, req)
            self.route_seconds += time.perf_counter() - t0
            self.num_routed += 1
        tracked = self.requests.get(req.request_id)
        if tracked is None:
            tracked = self.requests[req.request_id] = _Tracked(req, index, list(req.output_token_ids))
            tracked.predicted = route.predicted_output_tokens if parent is None else parent.predicted
        tracked.replica = index
        self.replicas[index].assign(req.request_id)
        self.routes.append((time.time(), req.request_id, index))
        self._send(index, req)

    def _route(self, route: RouteRequest, req: EngineCoreRequest) -> int:
        """The replica a new (or resumed) request goes to."""
        return self.router.route(route, self.loads())

    def _send(self, index: int, req: EngineCoreRequest) -> None:
        """Hand a placed request to its replica."""
        self.replicas[index].submit(["add", req])

    def _route_request(self, req: EngineCoreRequest) -> RouteRequest:
        n = len(req.prompt_token_ids)
        predicted = self.predictor.predict(n, req.client, {}).mean(cap=req.max_tokens)
        return RouteRequest(req.request_id, block_hashes(req.prompt_token_ids, self.rc.config.cache.block_size),
                            n, req.max_tokens, req.client, predicted)

    def loads(self) -> list[ReplicaLoad]:
        """Every replica's load, in replica order; a stalled one is not routable while another is."""
        now = time.monotonic()
        live = [r.healthy and not r.stalled(now) for r in self.replicas]
        if not any(live):
            live = [r.healthy for r in self.replicas]
        return [r.load(self.requests, ok) for r, ok in zip(self.replicas, live)]

    def abort_requests(self, request_ids, status=RequestStatus.FINISHED_ABORTED) -> None:
        by_replica: dict[int, list[str]] = {}
        for rid in request_ids:
            t = self._forget(rid)
            if t is not None:
                by_replica.setdefault(t.replica, []).append(rid)
        if self.parked:
            gone = set(request_ids)
            self.parked = [p for p in self.parked if p.request_id not in gone]
        for index, ids in by_replica.items():
            if self.replicas[index].healthy:
                self.replicas[index].submit(["abort", ids, status.value])

    def _forget(self, rid: str) -> _Tracked | None:
        t = self.requests.pop(rid, None)
        if t is not None:
            self._unassign(t)
        return t

    def _unassign(self, t: _Tracked) -> None:
        """The request no longer counts on its replica (it finished, moved or is being placed again)."""
        self.replicas[t.replica].assigned.discard(t.req.request_id)
        self.router.on_finished(t.req.request_id, t.replica)

    def reset_prefix_cache(self) -> None:
        for r in self.replicas:
            if r.healthy:
                r.submit(["reset_prefix_cache"])

    def has_unfinished(self) -> bool:
        return bool(self.requests) or bool(self.parked)

    @property
    def is_alive(self) -> bool:
        return self.dead is None

    def death_reason(self) -> str:
        return self.dead or "the replicas are gone"

    # ---- faults -------------------------------------------------------------------------------------------

    def _replica_down(self, r: Replica, why: str) -> None:
        if not r.healthy:
            return
        logger.warning("replica %d is down (%s); its %d requests resume elsewhere", r.index, why, len(r.assigned))
        r.down()
        self.router.on_replica_down(r.index)
        for rid in list(r.assigned):               # each is taken off r as it is placed again
            self._resume(self.requests[rid])
        ref = r.actor.ready.remote()                   # Ray restarts it; it answers once it is up again
        self.pending[ref] = ("ready", r.index, None, None)

    def _resume(self, t: _Tracked) -> None:
        """A request whose replica died goes elsewhere with the tokens it already produced."""
        self._unassign(t)
        t.migrating = False
        self.num_resumed += 1
        t.req = dataclasses.replace(t.req, output_token_ids=list(t.tokens))
        self._place(t.req)

    # ---- the wait set -------------------------------------------------------------------------------------

    def _poll(self, r: Replica) -> None:
        self.pending[r.actor.poll.remote(POLL_S)] = ("poll", r.index, r.incarnation, None)

    def _wait(self, refs: list, timeout: float) -> list:
        if not refs:
            time.sleep(min(timeout, 0.05))
            return []
        ready, rest = self._ray.wait(refs, num_returns=1, timeout=timeout)
        if ready and rest:
            more, _ = self._ray.wait(rest, num_returns=len(rest), timeout=0)
            ready += more
        return ready

    def _collect(self, ready: list) -> None:
        from ray.exceptions import ActorDiedError, RayError
        for ref in ready:
            kind, index, incarnation, data = self.pending.pop(ref)
            r = self.replicas[index]
            try:
                value = self._ray.get(ref)
            except ActorDiedError as e:
                if kind == "ready":                    # no restart left
                    r.gone = True
                    logger.error("replica %d is gone for good: %s", index, str(e).splitlines()[0])
                    if all(x.gone for x in self.replicas):
                        self.dead = "every replica died and none can be restarted"
                        self.buffer.append(["dead", self.dead])
                    continue
                value, error = None, e
            except RayError as e:
                value, error = None, e
            else:
                error = None
            if kind == "ready":
                if error is not None:                  # still restarting: ask again
                    self.pending[r.actor.ready.remote()] = ("ready", index, None, None)
                else:
                    r.restarts += 1
                    logger.warning("replica %d is back (pid %d)", index, value["pid"])
                    self._ready(r, value)
                continue
            if incarnation != r.incarnation:           # an answer from an earlier life
                continue
            if error is not None:
                if not self._call_failed(kind, r, error, data):
                    self._replica_down(r, str(error).splitlines()[0])
            elif kind == "poll":
                for msg in value:
                    self._message(r, msg)
                self._poll(r)
            else:
                self._answered(kind, r, value, data)
        if self.opts.migration_threshold:
            self._rebalance()

    def _call_failed(self, kind: str, r: Replica, error: Exception, data) -> bool:
        """A call to replica `r` failed; True when that is handled here, False when it means `r` is down."""
        if kind == "export":
            self._exported(data[0], data[1], None, None)
        return False

    def _answered(self, kind: str, r: Replica, value, data) -> None:
        """A call other than poll answered."""
        if kind == "export":
            self._exported(data[0], data[1], value, data[2])

    def _message(self, r: Replica, msg: list) -> None:
        if msg[0] == "outputs":
            outs = []
            for o in msg[1]:
                t = self.requests.get(o.request_id)
                if t is None or t.replica != r.index:  # moved away, resumed elsewhere, or aborted
                    continue
                t.tokens += o.new_token_ids
                if o.finish_reason is not None:
                    self._forget(o.request_id)
                    if o.finish_reason == RequestStatus.FINISHED_STOPPED.value:   # its true length: learn it
                        self.predictor.observe(len(t.req.prompt_token_ids), t.req.client, len(t.tokens))
                outs.append(o)
            r.stats, r.last_output = msg[2], time.monotonic()
            self.buffer.append(["outputs", outs, aggregate(self.replicas)])
        elif msg[0] == "error":
            t = self.requests.get(msg[1])
            if t is not None and t.replica == r.index:
                self._forget(msg[1])
                self.buffer.append(msg)

    # ---- what AsyncLLM and LLMEngine call -----------------------------------------------------------------

    async def get_message(self) -> list:
        while not self.buffer:
            ready = await asyncio.to_thread(self._wait, list(self.pending), POLL_S)
            self._collect(ready)
        return self.buffer.popleft()

    def step(self) -> list[EngineCoreOutput]:
        """LLMEngine's step: the outputs that arrived from any replica (waits for at least one message)."""
        while not self.buffer and self.has_unfinished():
            self._collect(self._wait(list(self.pending), POLL_S))
        outs = []
        while self.buffer:
            msg = self.buffer.popleft()
            if msg[0] == "outputs":
                outs += msg[1]
            elif msg[0] == "error":
                raise RuntimeError(f"request {msg[1]}: {msg[2]}")
            elif msg[0] == "dead":
                raise EngineDeadError(msg[1])
        return outs

    def replica_stats(self) -> list[dict]:
        return [r.describe(self.requests) for r in self.replicas]

    def router_stats(self) -> dict:
        """The router's decisions and their cost, and what the fleet did: resumes and migrations."""
        return {"policy": self.opts.router, "decisions": self.num_routed, "seconds": self.route_seconds,
                "mean_us": 1e6 * self.route_seconds / max(1, self.num_routed), "resumed": self.num_resumed,
                "migrations": self.num_migrations, "failed_migrations": self.num_failed_migrations,
                "recent": [{"time": t, "request_id": rid, "replica": i} for t, rid, i in list(self.routes)[-16:]]}

    def check_blocks(self) -> list[dict]:
        """The block invariant on every healthy replica (tests); none once shut down."""
        healthy = [r for r in self.replicas if r.healthy]
        return self._ray.get([r.actor.check_blocks.remote() for r in healthy])

    def kill(self) -> None:
        for r in self.replicas:
            self._ray.kill(r.actor, no_restart=True)

    def shutdown(self, timeout: float = 60.0) -> None:
        self.kill()
        for r in self.replicas:
            r.down()
            r.gone = True
        self.dead = self.dead or "shut down"

    def close(self) -> None:
        pass
