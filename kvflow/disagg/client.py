"""DisaggClient: prefill and decode on separate workers (survey §5.2.2: DistServe, TetriInfer, SplitWise,
Mooncake), behind the same engine-core interface as one replica, so AsyncLLM, the server and LLM run on it
unchanged. It is the cluster client (kvflow/cluster/client.py: tracking, resume on a dead worker, the wait
set) with a request's life in two phases:

  prefill   a new request goes to a prefill worker chosen by `router` (with `kv_transfer` async or
            layerwise, its decode worker is chosen at once by `pd_policy`, and the prefill worker streams
            the blocks there as they are computed); its first token streams to the caller from there
  decode    once the worker announces the handoff ("prefilled"), the request moves to its decode worker
            (sync: chosen now by `pd_policy`; it pulls the staged blocks with `kv_transport`) and goes on
            token for token: the caller sees one stream

Resumed requests (their worker died) go straight to a decode worker, which computes their prompt itself.
Mooncake's early rejection refuses a request (QueueFullError: 503 with Retry-After) before any work when the
decode workers' KV cache cannot hold what the requests in flight are predicted to need. With `pd_elastic`, a
worker changes roles when the load mix asks for it (elastic.py), each switch logged and kept.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections import deque

from kvflow.cluster.client import ClusterClient
from kvflow.cluster.fleet import Replica, connect_ray, replica_cpus, start_replicas
from kvflow.cluster.router import ReplicaLoad, RouteRequest, make_router
from kvflow.config import ResolvedConfig
from kvflow.disagg.connector import TransferPlan
from kvflow.disagg.elastic import RoleSwitch, choose_switch
from kvflow.engine.wire import EngineCoreRequest

logger = logging.getLogger("kvflow")

REJECT_RETRY_AFTER_S = 2


class DisaggClient(ClusterClient):
    def _start_replicas(self, rc: ResolvedConfig) -> list[Replica]:
        from kvflow.memory.host_store import HostKVStore
        from kvflow.disagg.worker import PDWorker
        d = rc.config.disagg
        self.pd = d
        count = d.prefill_replicas + d.decode_replicas
        ray = connect_ray(rc.config.cluster.ray_address, replica_cpus(rc.config.cluster.replica_cpus, count) * count)
        self.pool = ray.remote(HostKVStore).options(num_cpus=0).remote(d.kv_pool_bytes) if d.kv_pool else None
        self.roles = ["prefill"] * d.prefill_replicas + ["decode"] * d.decode_replicas
        self.pd_router = make_router(d.pd_policy, count, block_size=rc.config.cache.block_size)
        self.decode_target: dict[str, int] = {}         # request id -> decode worker chosen with its prefill
        self.route_of: dict[str, RouteRequest] = {}     # request id -> its RouteRequest (the prompt's hashes)
        self.need: dict[str, int] = {}                  # request id -> KV blocks it is predicted to hold
        self.needed_blocks = 0
        self.handoffs: dict[str, float] = {}            # request id -> when its prefill worker handed it off
        self.handoff_s: deque = deque(maxlen=1024)      # handoff -> first token from the decode worker
        self.pulls: deque = deque(maxlen=1024)          # sync: (seconds, bytes) of a decode worker's pull
        self.num_handoffs = self.num_rejected = self.num_fallbacks = self.kv_bytes = 0
        self.switches: list[RoleSwitch] = []
        self.last_switch = 0.0
        logger.info("disaggregated: %d prefill + %d decode workers, KV transfer %s, prefill by %s, decode by %s%s",
                    d.prefill_replicas, d.decode_replicas, d.kv_transfer, rc.config.cluster.router, d.pd_policy,
                    ", shared KV pool" if d.kv_pool else "")
        return start_replicas(rc, PDWorker, count, pool=self.pool)

    # ---- placing --------------------------------------------------------------------------------------------

    def _with_role(self, role: str, loads: list[ReplicaLoad]) -> list[ReplicaLoad]:
        """The loads of the healthy workers in `role`; all healthy workers when none of that role is up."""
        mine = [ld for ld in loads if ld.healthy and self.roles[ld.index] == role]
        return mine or [ld for ld in loads if ld.healthy]

    def loads(self) -> list[ReplicaLoad]:
        loads = super().loads()
        pulls = [(s, b) for s, b in list(self.pulls)[-32:] if b]
        per_block = sum(s for s, _ in pulls) / sum(b for _, b in pulls) * self.block_bytes if pulls else 0.0
        for ld in loads:                       # what min-queue and min-ttft read: measured, not assumed
            r = self.replicas[ld.index]
            ld.extra["queued_prefill_tokens"] = sum(
                len(t.req.prompt_token_ids) for t in (self.requests.get(rid) for rid in r.assigned)
                if t is not None and not t.tokens)
            ld.extra["prefill_tokens_per_s"] = r.stats.prefill_tokens_per_s
            ld.extra["transfer_s_per_block"] = per_block
        return loads

    def _route(self, route: RouteRequest, req: EngineCoreRequest) -> int:
        loads = self.loads()
        if req.output_token_ids:               # resumed: a decode worker computes its prompt itself
            return self.pd_router.route(route, self._with_role("decode", loads))
        if self.pd.early_rejection and req.request_id not in self.need:
            self._admit(route, req, loads)
        self.route_of[req.request_id] = route            # the decode worker is chosen by it too
        if self.pd.kv_transfer != "sync":                 # streamed: the decode worker is chosen now
            self.decode_target[req.request_id] = self.pd_router.route(route, self._with_role("decode", loads))
        return self.router.route(route, self._with_role("prefill", loads))

    def _admit(self, route: RouteRequest, req: EngineCoreRequest, loads: list[ReplicaLoad]) -> None:
        """Mooncake's early rejection: refuse now, before any prefill, when the decode workers' KV blocks
        cannot hold this request beside those in flight (prompt plus predicted output, in blocks)."""
        from kvflow.engine.async_llm import QueueFullError
        bs = self.rc.config.cache.block_size
        expected = min(req.max_tokens, route.predicted_output_tokens or req.max_tokens)
        need = math.ceil((len(req.prompt_token_ids) + expected) / bs)
        capacity = sum(ld.num_kv_blocks for ld in self._with_role("decode", loads))
        if self.needed_blocks + need > capacity:
            self.num_rejected += 1
            raise QueueFullError(f"the decode workers have no KV memory for this request: it needs about {need} "
                                 f"blocks, {max(0, capacity - self.needed_blocks)} of {capacity} are free of the "
                                 f"requests in flight", retry_after=REJECT_RETRY_AFTER_S)
        self.need[req.request_id] = need
        self.needed_blocks += need

    def _send(self, index: int, req: EngineCoreRequest) -> None:
        r = self.replicas[index]
        if req.output_token_ids or self.roles[index] != "prefill":
            r.submit(["add", req])
            return
        plan = TransferPlan(self.pd.kv_transfer, self.pd.kv_transport)
        if plan.mode != "sync":               # blocks stream to the decode worker chosen with the prefill one
            target = self.decode_target.get(req.request_id)
            if target is None:                 # a fork placed beside its parent, not routed
                target = self.decode_target[req.request_id] = self._pick_decode(req)
            d = self.replicas[target]
            plan.dst, plan.dst_incarnation = d.actor, d.incarnation
        r.submit(["prefill", req, plan])

    def _pick_decode(self, req: EngineCoreRequest) -> int:
        route = self.route_of.get(req.request_id) or self._route_request(req)
        return self.pd_router.route(route, self._with_role("decode", self.loads()))

    def _forget(self, rid: str):
        self.route_of.pop(rid, None)
        self.decode_target.pop(rid, None)
        self.handoffs.pop(rid, None)
        self.needed_blocks -= self.need.pop(rid, 0)
        return super()._forget(rid)

    # ---- the handoff ------------------------------------------------------------------------------------------

    def _message(self, r: Replica, msg: list) -> None:
        if msg[0] != "prefilled":
            if msg[0] == "outputs" and self.handoffs:
                now = time.monotonic()
                for o in msg[1]:
                    since = self.handoffs.get(o.request_id)
                    t = self.requests.get(o.request_id)
                    if since is not None and t is not None and t.replica == r.index and o.new_token_ids:
                        self.handoff_s.append(now - self.handoffs.pop(o.request_id))
            return super()._message(r, msg)
        _, rid, meta, desc = msg
        t = self.requests.get(rid)
        if t is None or t.replica != r.index:   # aborted, or resumed elsewhere meanwhile
            return
        missing = meta["output_token_ids"][len(t.tokens):]
        if missing:                             # cannot happen (the outputs message comes first); kept safe
            t.tokens += missing
        req = dataclasses.replace(t.req, output_token_ids=list(t.tokens), fork_from=None)
        planned = self.decode_target.pop(rid, None)
        healthy = planned is not None and self.replicas[planned].healthy
        target = planned if healthy else self._pick_decode(req)
        d = self.replicas[target]
        self._unassign(t)
        t.replica = d.index
        d.assign(rid)
        self.num_handoffs += 1
        self.kv_bytes += meta["num_blocks"] * self.block_bytes
        self.handoffs[rid] = time.monotonic()
        if desc is not None:                   # sync: the decode worker pulls the staged blocks
            call = d.actor.pull_request.remote(d.incarnation, d.next_seq(), req, meta, desc)
            self.pending[call] = ("import", d.index, d.incarnation, (rid, r.index, desc["transport"]))
        elif target == planned:                # streamed: it waits there for the blocks
            d.submit(["expect", req, meta["num_blocks"]])
        else:                                  # streamed to a worker that died since: computed here
            self.num_fallbacks += 1
            d.submit(["add", req])

    def _call_failed(self, kind: str, r: Replica, error: Exception, data) -> bool:
        from ray.exceptions import ActorDiedError
        if kind != "import" or isinstance(error, ActorDiedError):
            return super()._call_failed(kind, r, error, data)
        rid = data[0]                          # the blocks could not be pulled (their prefill worker died)
        t = self.requests.get(rid)
        if t is not None and t.replica == r.index:
            self.num_fallbacks += 1
            logger.warning("request %s: its KV blocks could not be pulled (%s); computed on the decode worker",
                           rid, str(error).splitlines()[0])
            r.submit(["add", dataclasses.replace(t.req, output_token_ids=list(t.tokens), fork_from=None)])
        return True

    def _answered(self, kind: str, r: Replica, value, data) -> None:
        if kind == "import":                   # pulled: the prefill worker lets go of the staged blocks
            rid, src, transport = data
            self.pulls.append((value["seconds"], value["bytes"]))
            if not value["bytes"]:             # nothing came: the decode worker computes the prompt
                self.num_fallbacks += 1
            if self.replicas[src].healthy:
                self.replicas[src].submit(["release", rid, transport])
        else:
            super()._answered(kind, r, value, data)

    @property
    def block_bytes(self) -> int:
        return self.rc.block_bytes

    # ---- elastic roles ----------------------------------------------------------------------------------------

    def _collect(self, ready: list) -> None:
        super()._collect(ready)
        if self.pd.pd_elastic:
            now = time.monotonic()
            switch = choose_switch(self.roles, self.loads(), self.rc.config.scheduler, now - self.last_switch)
            if switch is not None:
                self.roles[switch.worker] = switch.new
                self.last_switch = now
                self.switches.append(switch)
                logger.warning("worker %d switches from %s to %s: %s", switch.worker, switch.old, switch.new,
                               switch.why)

    # ---- what the server and the benchmarks read ---------------------------------------------------------------

    def replica_stats(self) -> list[dict]:
        stats = super().replica_stats()
        for d in stats:
            d["role"] = self.roles[d["index"]]
        return stats

    def router_stats(self) -> dict:
        s = super().router_stats()
        pulls = list(self.pulls)
        s["disagg"] = {
            "kv_transfer": self.pd.kv_transfer, "kv_transport": self.pd.kv_transport, "prefill_policy": self.opts.router, "decode_policy": self.pd.pd_policy,
            "handoffs": self.num_handoffs, "rejected": self.num_rejected, "fallbacks": self.num_fallbacks,
            "kv_bytes": self.kv_bytes,
            "handoff_s": list(self.handoff_s)[-256:],
            "pull_s": [p for p, _ in pulls][-256:], "pull_bytes": sum(b for _, b in pulls),
            "roles": list(self.roles), "switches": [dataclasses.asdict(x) for x in self.switches]}
        return s

    def transfer_stats(self) -> list[dict]:
        """Each worker's transfer counters (bytes sent and received, blocks, KV waits, pool hits): a blocking
        call, for tests and benchmarks."""
        healthy = [r for r in self.replicas if r.healthy]
        return self._ray.get([r.actor.transfer_stats.remote() for r in healthy])

    def pool_stats(self) -> dict | None:
        return self._ray.get(self.pool.stats.remote()) if self.pool is not None else None

    def kill(self) -> None:
        super().kill()
        if self.pool is not None:
            self._ray.kill(self.pool, no_restart=True)
