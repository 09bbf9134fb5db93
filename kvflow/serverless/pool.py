"""The engine processes behind serverless replicas, and the pre-warmed pool of them.

`ServerlessWorker` is the cluster's EngineReplica (kvflow/cluster/replica.py: an EngineCore stepping on its
own thread, reached with submit/poll), started with every phase of its cold start timed (cold_start.py) and
two more calls: `export_cache` (its prefix cache as host arrays, for the KV keeper, run on the core's thread
between steps) and `cached_prefix`.

`WarmPool` (a named Ray actor) keeps `size` workers fully started: runtime imported, kernels built, weights
read, KV cache allocated, warmed up. A Ray Serve replica that starts takes one (`claim`) and is serving as
soon as it has attached; only when the pool is empty does it start its own worker from nothing (a true cold
start). The pool refills in the background, a little after each claim (on a small machine the new process
would otherwise compete with the first tokens of the replica that just claimed). The pool is also the
serverless application's registry: replicas report their starts and stops here (metrics.py reads them).
"""
from __future__ import annotations

import concurrent.futures
import logging
import os
import threading
import time
from collections import deque

from kvflow.cluster.replica import EngineReplica, claim_cores

logger = logging.getLogger("kvflow")

REFILL_DELAY_S = 5.0
WATCH_S = 2.0


class ServerlessWorker(EngineReplica):
    def __init__(self, config_json: str, index: int, cpus: float | None = None, log_level: str = "WARNING",
                 asked_at: float | None = None):
        from kvflow.serverless.cold_start import start_core
        logging.basicConfig(level=log_level, format=f"%(levelname)s kvflow.worker{index}: %(message)s")
        logging.getLogger("kvflow").setLevel(log_level)
        self.index = index
        self.cores = sorted(os.sched_getaffinity(0))
        if cpus:
            self.cores = claim_cores(max(1, round(cpus)))
            os.sched_setaffinity(0, self.cores)
        core, self.breakdown = start_core(config_json, len(self.cores) if cpus else None, asked_at)
        self.load_s = sum(v for k, v in self.breakdown.items() if k != "process")
        self._serve(core, f"worker{index}-core")

    def ready(self) -> dict:
        info = super().ready()
        info["breakdown"] = dict(self.breakdown)
        return info

    def export_cache(self, max_blocks: int):
        """(hashes, dtypes, arrays) of the prefix cache, read on the core's thread."""
        done: concurrent.futures.Future = concurrent.futures.Future()
        self.inbox.put((None, "export_cache", (max_blocks, done)))
        return done.result()

    def cached_prefix(self, hashes: list[int]) -> int:
        from kvflow.cluster.kv_transfer import cached_prefix
        return cached_prefix(self.core, hashes)

    def _apply(self, kind: str, payload) -> None:
        if kind != "export_cache":
            return super()._apply(kind, payload)
        from kvflow.serverless.kv_keeper import export_prefix_cache
        max_blocks, done = payload
        try:
            done.set_result(export_prefix_cache(self.core, max_blocks))
        except Exception as e:
            logger.exception("export of the prefix cache failed")
            done.set_exception(e)


class _Slot:
    """A worker the pool is starting; a claim may reserve it and wait for it."""

    def __init__(self):
        self.go, self.done = threading.Event(), threading.Event()
        self.reserved = False
        self.result = None


def worker_class(cpus: float):
    import ray
    return ray.remote(ServerlessWorker).options(num_cpus=cpus, max_restarts=0, max_task_retries=0,
                                                max_concurrency=8)


class WarmPool:
    """A threaded Ray actor: the warm workers, and the application's record of replica starts and stops."""

    def __init__(self, config_json: str, size: int, cpus: float, log_level: str = "WARNING"):
        if size < 0:
            raise ValueError(f"the warm pool's size must be >= 0, got {size}")
        self.config_json, self.size, self.cpus, self.log_level = config_json, size, cpus, log_level
        self.lock = threading.Lock()
        self.ready: deque = deque()          # (actor, info), oldest first
        self.slots: list[_Slot] = []         # workers being started
        self.made = 0
        self.claims = self.misses = 0
        self.starts: list[dict] = []         # one per replica start: kind, breakdown, times
        self.live: dict[str, float] = {}     # replica id -> when it started
        self.workers_: dict[str, object] = {}  # replica id -> its engine worker (tests check its blocks)
        # (time, +1 | -1): a replica counts from when Serve started it (its engine still loading) until it stopped
        self.events: list[tuple[float, int]] = [(time.time(), 0)]
        self.closed = False
        self.watched: dict[str, object] = {}   # replica id -> the Serve replica's actor
        self._refill(0.0)
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        """Every WATCH_S: a Serve replica that died without its `__del__` leaves its worker to us: stop it."""
        import ray
        from ray.exceptions import RayActorError
        while not self.closed:
            time.sleep(WATCH_S)
            with self.lock:
                watched = list(self.watched.items())
            for replica_id, actor in watched:
                try:
                    ray.get(actor.__ray_ready__.remote(), timeout=WATCH_S)
                except RayActorError:
                    with self.lock:
                        worker = self.workers_.get(replica_id)
                    logger.warning("serverless replica %s died; stopping its engine worker", replica_id)
                    if worker is not None:
                        ray.kill(worker)
                    self.replica_stopped(replica_id)
                except Exception:                  # busy or slow: asked again next time
                    pass

    # ---- the pool -------------------------------------------------------------------------------------------

    def _refill(self, delay: float) -> None:
        with self.lock:
            need = self.size - len(self.ready) - sum(not slot.reserved for slot in self.slots)
            if need <= 0 or self.closed:
                return
            slots = [_Slot() for _ in range(need)]
            self.slots += slots
        for slot in slots:
            threading.Thread(target=self._start_one, args=(slot, delay), daemon=True).start()

    def _start_one(self, slot: "_Slot", delay: float) -> None:
        import ray
        slot.go.wait(delay)                    # a claim of this slot starts it at once
        actor, info = None, None
        try:
            with self.lock:
                self.made += 1
                index = 100 + self.made
            actor = worker_class(self.cpus).remote(self.config_json, index, self.cpus, self.log_level, time.time())
            info = ray.get(actor.ready.remote())
        except Exception as e:
            logger.error("a warm-pool worker failed to start: %s", e)
            actor = None
        with self.lock:
            self.slots.remove(slot)
            slot.result = (actor, info) if actor is not None else None
            if actor is not None and not self.closed and not slot.reserved:
                self.ready.append((actor, info))
                actor = None
        slot.done.set()
        if actor is not None and not slot.reserved:
            ray.kill(actor)

    def claim(self, wait_s: float = 600.0):
        """(worker, its `ready` info, kind): a started worker ("warm"); else one the pool is starting already,
        waited for ("warming": its load is under way, and a second one would only compete with it); else
        None (the caller starts its own, a cold start). The pool then refills."""
        with self.lock:
            item, slot = (self.ready.popleft() if self.ready else None), None
            if item is None:
                slot = next((x for x in self.slots if not x.reserved), None)
                if slot is not None:
                    slot.reserved = True
                    slot.go.set()
                else:
                    self.misses += 1
            if item is not None or slot is not None:
                self.claims += 1
        self._refill(REFILL_DELAY_S)
        if item is not None:
            return (*item, "warm")
        if slot is None or not slot.done.wait(wait_s) or slot.result is None:
            return None
        return (*slot.result, "warming")

    def pool_state(self) -> dict:
        with self.lock:
            return {"size": self.size, "ready": len(self.ready), "starting": len(self.slots), "claims": self.claims,
                    "misses": self.misses, "made": self.made,
                    "ready_pids": [info["pid"] for _, info in self.ready]}

    def close(self) -> None:
        import ray
        with self.lock:
            self.closed = True
            ready, self.ready = list(self.ready), deque()
        for actor, _ in ready:
            ray.kill(actor)

    # ---- the registry -----------------------------------------------------------------------------------------

    def replica_started(self, replica_id: str, record: dict, worker=None, replica=None) -> None:
        """A Serve replica is serving with `worker` ([actor]); `replica` ([its own actor]) is watched: if it dies
        without stopping (killed, its node lost), its worker is stopped here."""
        with self.lock:
            if replica:
                self.watched[replica_id] = replica[0]
            self.starts.append(dict(record, replica=replica_id))
            self.live[replica_id] = time.time()
            self.workers_[replica_id] = worker[0] if worker else None
            self.events.append((record.get("started_at", time.time()), 1))

    def replica_stopped(self, replica_id: str) -> None:
        with self.lock:
            self.workers_.pop(replica_id, None)
            self.watched.pop(replica_id, None)
            if self.live.pop(replica_id, None) is not None:
                self.events.append((time.time(), -1))

    def workers(self) -> dict:
        with self.lock:
            return {k: [w] for k, w in self.workers_.items() if w is not None}

    def registry(self) -> dict:
        with self.lock:
            events, starts, live = sorted(self.events), list(self.starts), sorted(self.live)
        timeline, n = [], 0
        for t, d in events:                  # the replica count after each start and stop
            n += d
            timeline.append((t, n))
        return {"starts": starts, "live": live, "timeline": timeline}
