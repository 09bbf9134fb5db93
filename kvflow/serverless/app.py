"""The Ray Serve application: one autoscaled deployment whose replicas are kvflow engines.

Ray Serve's own autoscaler sizes it (min_replicas may be 0; upscaling on requests in flight per replica,
`target_ongoing_requests`; scale-down after `scale_down_idle_s` without the load for it). A replica of
`EngineDeployment` is a thin Serve actor attached to an engine worker (pool.py): taken from the warm pool, or,
when the pool is empty, started from nothing. Its one method, `generate(EngineCoreRequest)`, is a stream:
first a "started" record (which replica, when it started, how), then (outputs, stats) pairs until the request
finishes. Before adding a request it asks the KV keeper (kv_keeper.py) for the part of its prompt's prefix
that this replica's cache lacks and adopts it. On scale-down Serve drains the replica (no new requests; it
waits for those in flight, `graceful_shutdown_timeout_s`), then calls `__del__`: the prefix cache goes to the
KV keeper and the worker is stopped.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time

from kvflow.memory.kv_cache_manager import extend_block_hashes

logger = logging.getLogger("kvflow")

APP_NAME = "kvflow-serverless"
DEPLOYMENT = "EngineDeployment"
POLL_S = 0.5
DRAIN_TIMEOUT_S = 600.0          # Serve waits this long for the requests in flight of a replica it stops
EXPORT_MAX_BLOCKS = 4096
METRICS_INTERVAL_S = 0.5
# Serve counts a request twice for a moment after a new replica takes it (queued at the handle, running at the
# replica): with no delay, one request at target_ongoing_requests=1 starts a second replica
UPSCALE_DELAY_S = 2.0


class EngineDeployment:
    def __init__(self, config_json: str, names: dict, keep_kv: bool, block_size: int, cpus: float,
                 log_level: str = "WARNING"):
        import ray
        from ray import serve

        from kvflow.serverless.pool import worker_class
        self.started_at = time.time()
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        ns = names["namespace"]
        self.pool = ray.get_actor(names["pool"], namespace=ns)
        self.keeper = ray.get_actor(names["keeper"], namespace=ns) if keep_kv else None
        self.block_size = block_size
        claimed = ray.get(self.pool.claim.remote())
        if claimed is not None:                           # warm, or "warming": one the pool was starting
            self.worker, info, self.kind = claimed
        else:                                             # a true cold start: a new process, weights from disk
            self.kind = "cold"
            self.worker = worker_class(cpus).remote(config_json, 0, cpus, log_level, time.time())
            info = ray.get(self.worker.ready.remote())
        self.info, self.incarnation, self.seq = info, info["incarnation"], 0
        self.ready_at = time.time()
        self.queues: dict[str, asyncio.Queue] = {}
        self.dead: str | None = None
        self.poller: asyncio.Task | None = None
        self.seen: set[int] = set()                       # prefix blocks this replica holds or computed
        self.record = {"kind": self.kind, "started_at": self.started_at, "ready_at": self.ready_at,
                       "attach_s": self.ready_at - self.started_at, "breakdown": info.get("breakdown", {}),
                       "worker_pid": info["pid"], "replica_pid": os.getpid()}
        me = ray.get_runtime_context().current_actor
        ray.get(self.pool.replica_started.remote(self.replica_id, self.record, [self.worker], [me]))

    # ---- Serve calls -------------------------------------------------------------------------------------------

    def check_health(self) -> None:
        if self.dead is not None:
            raise RuntimeError(f"the engine worker is gone: {self.dead}")

    async def generate(self, req):
        """A stream: {"started"...} first, then ([EngineCoreOutput], EngineStats) until the request ends."""
        self.check_health()
        if self.poller is None:
            self.poller = asyncio.get_running_loop().create_task(self._poll())
        yield {"replica": self.replica_id, "kind": self.kind, "started_at": self.started_at,
               "ready_at": self.ready_at, "pid": self.info["pid"], "arrived_at": time.time()}
        rid = req.request_id
        q = self.queues[rid] = asyncio.Queue()
        finished = False
        try:
            meta, arrays = await self._prefix_from_keeper(req)
            seq = self._next_seq()
            if meta is None:
                self.worker.submit.remote(self.incarnation, seq, [["add", req]])
            else:
                self.worker.import_request.remote(self.incarnation, seq, req, meta, arrays)
            while not finished:
                item = await q.get()
                if isinstance(item, str):
                    raise RuntimeError(item)
                outs, stats = item
                finished = any(o.finish_reason is not None for o in outs)
                yield outs, stats
        finally:
            self.queues.pop(rid, None)
            if not finished and self.dead is None:
                from kvflow.request import RequestStatus
                self.worker.submit.remote(self.incarnation, self._next_seq(),
                                          [["abort", [rid], RequestStatus.FINISHED_ABORTED.value]])

    async def stats(self) -> dict:
        return {"replica": self.replica_id, "kind": self.kind, "pid": self.info["pid"],
                "requests": len(self.queues), "record": self.record}

    async def check_blocks(self) -> dict:
        return await self.worker.check_blocks.remote()

    async def __del__(self):
        """Drained by Serve (no request in flight): keep the prefix cache, stop the worker."""
        import ray
        try:
            if self.keeper is not None and self.dead is None:
                hashes, dtypes, arrays = self.worker.export_cache.options(num_returns=3).remote(EXPORT_MAX_BLOCKS)
                n = await self.keeper.put.remote(hashes, dtypes, arrays)
                logger.info("replica %s kept %d new prefix blocks", self.replica_id, n)
        except Exception as e:
            logger.warning("could not keep the prefix cache of replica %s: %s", self.replica_id, e)
        finally:
            if self.poller is not None:
                self.poller.cancel()
            ray.kill(self.worker)
            try:
                await self.pool.replica_stopped.remote(self.replica_id)
            except Exception:
                pass

    # ---- inside ---------------------------------------------------------------------------------------------------

    def _next_seq(self) -> int:
        self.seq += 1
        return self.seq - 1

    async def _prefix_from_keeper(self, req):
        """(meta, arrays ref) for the stored prefix blocks this replica lacks, or (None, None)."""
        if self.keeper is None:
            return None, None
        hashes = extend_block_hashes([], req.prompt_token_ids, self.block_size)
        # the last block is never a hit (at least one token is computed): leave it out
        hashes = hashes[:max(0, (len(req.prompt_token_ids) - 1) // self.block_size)]
        todo = hashes
        while todo and todo[0] in self.seen:
            todo = todo[1:]
        self.seen.update(hashes)
        if not todo:
            return None, None
        try:
            skip = len(hashes) - len(todo)
            keys_ref, dtypes_ref, arrays_ref = self.keeper.get.options(num_returns=3).remote(hashes, skip)
            keys, dtypes = await keys_ref, await dtypes_ref
        except Exception as e:
            logger.warning("the KV keeper did not answer: %s", e)
            return None, None
        if not keys:
            return None, None
        return {"hashes": keys, "dtypes": dtypes}, arrays_ref

    async def _poll(self) -> None:
        while True:
            try:
                msgs = await self.worker.poll.remote(POLL_S)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.dead = str(e).splitlines()[0]
                logger.error("replica %s lost its engine worker: %s", self.replica_id, self.dead)
                for q in self.queues.values():
                    q.put_nowait(f"the engine worker died: {self.dead}")
                return
            for msg in msgs:
                if msg[0] == "outputs":
                    by_id: dict[str, list] = {}
                    for o in msg[1]:
                        by_id.setdefault(o.request_id, []).append(o)
                    for rid, outs in by_id.items():
                        q = self.queues.get(rid)
                        if q is not None:
                            q.put_nowait((outs, msg[2]))
                elif msg[0] == "error":
                    q = self.queues.get(msg[1])
                    if q is not None:
                        q.put_nowait(str(msg[2]))


def autoscaling_config(opts) -> dict:
    """Ray Serve's autoscaling settings for these ServerlessOptions."""
    idle = float(opts.scale_down_idle_s)
    look_back = max(1.0, min(10.0, idle / 2 if idle else 1.0))
    return {"min_replicas": opts.min_replicas, "max_replicas": opts.max_replicas,
            "initial_replicas": opts.min_replicas, "target_ongoing_requests": opts.target_ongoing_requests,
            "upscale_delay_s": UPSCALE_DELAY_S, "downscale_delay_s": idle, "downscale_to_zero_delay_s": idle,
            "look_back_period_s": look_back,
            # deprecated, but still how often Serve's handles and replicas report their load (default 10 s)
            "metrics_interval_s": METRICS_INTERVAL_S}


def build_app(rc, names: dict, cpus: float, log_level: str):
    """The bound Serve application for this resolved config."""
    import warnings

    from ray import serve
    opts = rc.config.serverless
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        deployment = serve.deployment(
            EngineDeployment, name=DEPLOYMENT, autoscaling_config=autoscaling_config(opts),
            ray_actor_options={"num_cpus": 0}, max_ongoing_requests=max(8, rc.config.scheduler.max_num_seqs),
            graceful_shutdown_wait_loop_s=0.5, graceful_shutdown_timeout_s=DRAIN_TIMEOUT_S,
            health_check_period_s=2.0, health_check_timeout_s=30.0)
        return deployment.bind(rc.to_json(), names, opts.keep_kv, rc.config.cache.block_size, cpus, log_level)
