"""ServeClient: the engine-core client of a serverless fleet (the Ray Serve application of app.py).

It speaks the interface of the other engine-core clients (kvflow/engine/core_client.py), so AsyncLLM, the
OpenAI server and its routes run unchanged on top of it. Each request is one streaming call through a Serve
DeploymentHandle: Serve routes it, queues it while no replica is up, and its autoscaler counts it (a call
waiting at a fleet of zero replicas makes Serve start one at once). The client
  waits       for a replica at most `scale_up_timeout_s` (until the replica's "started" record arrives), then
              refuses the request: 503 with Retry-After (an error message with a retry-after), never a hang
  resumes     a request whose replica died (its stream fails): a new call with the tokens already sent, which
              Serve routes to a live replica or to a new one; the caller sees neither an error nor repeats
  measures    which requests waited for a scale-up and their time to first token (metrics.py)
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid

from kvflow.config import ResolvedConfig
from kvflow.engine.core_client import EngineCoreClient
from kvflow.engine.wire import EngineStats
from kvflow.request import RequestStatus
from kvflow.serverless.metrics import ServerlessMetrics

logger = logging.getLogger("kvflow")

NAMESPACE = "kvflow-serverless"
RESUME_BACKOFF_S = 0.25
RETRY_AFTER_S = 5
POOL_FILL_TIMEOUT_S = 300.0


class ServeClient(EngineCoreClient):
    def __init__(self, rc: ResolvedConfig):
        self.rc, self.opts = rc, rc.config.serverless
        self.cpus = float(rc.config.cluster.replica_cpus or 1.0)
        suffix = uuid.uuid4().hex[:8]
        self.app_name = f"kvflow-serverless-{suffix}"
        self.names = {"namespace": NAMESPACE, "pool": f"kvflow-pool-{suffix}", "keeper": f"kvflow-kv-{suffix}"}
        self.handle = self.pool = self.keeper = None
        self.messages: asyncio.Queue | None = None
        self.tasks: dict[str, asyncio.Task] = {}
        self.tokens: dict[str, list[int]] = {}
        self.replica_stats_: dict[str, EngineStats] = {}
        self.metrics = ServerlessMetrics()
        self.dead: str | None = None
        self.num_resumed = 0

    # ---- start and stop -------------------------------------------------------------------------------------

    def _deploy(self, timeout: float) -> dict:
        import logging as _logging

        from kvflow.cluster.fleet import connect_ray
        from kvflow.serverless.app import build_app
        from kvflow.memory.host_store import HostKVStore
        from kvflow.serverless.pool import WarmPool
        cpus = self.cpus * (self.opts.max_replicas + self.opts.warm_pool)
        ray = connect_ray(self.rc.config.cluster.ray_address, cpus)
        from ray import serve
        level = _logging.getLevelName(logger.getEffectiveLevel())
        config = self.rc.to_json()
        self.pool = ray.remote(WarmPool).options(name=self.names["pool"], namespace=NAMESPACE, num_cpus=0,
                                                 max_concurrency=16).remote(config, self.opts.warm_pool, self.cpus,
                                                                            level)
        if self.opts.keep_kv:
            self.keeper = ray.remote(HostKVStore).options(name=self.names["keeper"], namespace=NAMESPACE,
                                                       num_cpus=0).remote(self.opts.keep_kv_bytes)
        serve.start(proxy_location="Disabled", http_options={"host": "127.0.0.1"})
        self.handle = serve.run(build_app(self.rc, self.names, self.cpus, level), name=self.app_name,
                                route_prefix=None)
        deadline = time.monotonic() + min(timeout, POOL_FILL_TIMEOUT_S)
        while time.monotonic() < deadline:                 # the first request after start is a warm start
            state = ray.get(self.pool.pool_state.remote())
            if state["ready"] >= self.opts.warm_pool:
                break
            time.sleep(0.2)
        logger.info("serverless app %s deployed (min %d, max %d replicas, warm pool %d)", self.app_name,
                    self.opts.min_replicas, self.opts.max_replicas, self.opts.warm_pool)
        return {"num_kv_blocks": self.rc.num_kv_blocks, "replicas": []}

    async def wait_ready(self, timeout: float) -> dict:
        self.messages = asyncio.Queue()
        return await asyncio.to_thread(self._deploy, timeout)

    def shutdown(self, timeout: float = 60.0) -> None:
        import ray
        from ray import serve
        for t in self.tasks.values():
            t.cancel()
        try:
            serve.delete(self.app_name)
        except Exception as e:
            logger.warning("could not delete the Serve app %s: %s", self.app_name, e)
        for actor in (self.pool, self.keeper):
            if actor is not None:
                try:
                    if actor is self.pool:
                        ray.get(actor.close.remote(), timeout=timeout)
                    ray.kill(actor)
                except Exception:
                    pass
        self.dead = self.dead or "shut down"

    def kill(self) -> None:
        self.shutdown(10.0)

    def close(self) -> None:
        pass

    @property
    def is_alive(self) -> bool:
        return self.dead is None

    def death_reason(self) -> str:
        return self.dead or "the serverless app is gone"

    # ---- requests ----------------------------------------------------------------------------------------------

    def add_request(self, req) -> None:
        if req.fork_from is not None:          # a sample may land on another replica: it computes its own prompt
            req = dataclasses.replace(req, fork_from=None)
        self.tokens[req.request_id] = list(req.output_token_ids)
        loop = asyncio.get_running_loop()
        self.tasks[req.request_id] = loop.create_task(self._run(req, time.time()))

    def abort_requests(self, request_ids, status=RequestStatus.FINISHED_ABORTED) -> None:
        for rid in request_ids:
            t = self.tasks.pop(rid, None)
            self.tokens.pop(rid, None)
            if t is not None:
                t.cancel()

    def reset_prefix_cache(self) -> None:
        if self.keeper is not None:
            self.keeper.clear.remote()

    def has_unfinished(self) -> bool:
        return bool(self.tasks)

    async def get_message(self) -> list:
        return await self.messages.get()

    def _stats(self) -> EngineStats:
        total = EngineStats()
        for s in self.replica_stats_.values():
            for f in ("num_running", "num_waiting", "prefix_cache_queries", "prefix_cache_hits", "num_preemptions"):
                setattr(total, f, getattr(total, f) + getattr(s, f))
        return total

    async def _run(self, req, arrived: float) -> None:
        rid = req.request_id
        resumes, give_up_at = 0, 0.0
        try:
            while True:
                gen = self.handle.options(stream=True).generate.remote(
                    dataclasses.replace(req, output_token_ids=list(self.tokens.get(rid, []))))
                try:
                    try:
                        started = await asyncio.wait_for(gen.__anext__(), self.opts.scale_up_timeout_s)
                    except asyncio.TimeoutError:
                        gen.cancel()
                        self.metrics.refused += 1
                        self._refuse(rid, f"no serverless replica could start within {self.opts.scale_up_timeout_s:g}s")
                        return
                    waited = started["started_at"] > arrived            # this request waited for a scale-up
                    first = True
                    async for outs, stats in gen:
                        self.replica_stats_[started["replica"]] = stats
                        for o in outs:
                            self.tokens.setdefault(rid, []).extend(o.new_token_ids)
                        if first and any(o.new_token_ids for o in outs):
                            now = time.time()
                            phases = {"scale_up_and_process": started["started_at"] - arrived,
                                      "attach": started["ready_at"] - started["started_at"],
                                      "first_token": now - started["ready_at"]} if waited else None
                            self.metrics.first_token(now - arrived, started["kind"] if waited else None, phases)
                            first = False
                        self.messages.put_nowait(["outputs", outs, self._stats()])
                        if any(o.finish_reason is not None for o in outs):
                            return
                    return
                except asyncio.CancelledError:
                    gen.cancel()
                    raise
                except Exception as e:                    # the replica or its worker died: resume elsewhere
                    if resumes == 0:
                        self.num_resumed += 1
                        give_up_at = time.monotonic() + self.opts.scale_up_timeout_s
                    resumes += 1
                    if time.monotonic() > give_up_at:
                        self.messages.put_nowait(["error", rid, f"the request failed after {resumes} tries: {e}"])
                        return
                    logger.warning("request %s resumes on another replica (%s)", rid, str(e).splitlines()[0])
                    # Serve replaces a replica whose worker died once its health check fails: until then
                    # a call may reach it again and fail at once
                    await asyncio.sleep(min(RESUME_BACKOFF_S * resumes, 2.0))
        finally:
            if self.tasks.get(rid) is asyncio.current_task():
                self.tasks.pop(rid, None)
                self.tokens.pop(rid, None)

    def _refuse(self, rid: str, why: str) -> None:
        """AsyncLLM fails the request with QueueFullError (503, Retry-After)."""
        self.messages.put_nowait(["error", rid, why, RETRY_AFTER_S])

    # ---- what the server and the tests read ---------------------------------------------------------------------

    def serverless_stats(self) -> dict:
        import ray
        registry = ray.get(self.pool.registry.remote()) if self.pool is not None else {}
        return {"app": self.app_name, "pool": ray.get(self.pool.pool_state.remote()) if self.pool else {},
                "keeper": ray.get(self.keeper.stats.remote()) if self.keeper else None,
                "resumed": self.num_resumed, **self.metrics.summary(registry)}

    def replica_workers(self) -> dict:
        """Each live replica's engine worker actor, by replica id (tests: the block invariant, kills)."""
        import ray
        return {k: v[0] for k, v in ray.get(self.pool.workers.remote()).items()} if self.pool is not None else {}

    def check_blocks(self) -> dict:
        """The block invariant on every live replica's engine worker, by replica id; {"gone": True} for a worker
        that died (its replica is being replaced)."""
        import ray
        from ray.exceptions import RayActorError
        out = {}
        for replica_id, w in self.replica_workers().items():
            try:
                out[replica_id] = ray.get(w.check_blocks.remote(), timeout=30)
            except RayActorError:
                out[replica_id] = {"gone": True}
        return out
