"""One engine replica: an EngineCore inside a Ray actor (the cluster client makes it one with `ray.remote`).

The core steps on its own thread, exactly as in the single-replica engine-core process (it applies the same
messages, kvflow.engine.core_process.handle). The client reaches it with Ray calls only:
  submit(inc, seq, messages)     frontend messages (add, abort, reset_prefix_cache), applied in `seq` order
                                 (a threaded actor may run two calls at once: the order is the client's);
                                 `inc` names the life of the actor they were meant for (a call that reaches
                                 the actor after Ray restarted it is dropped: the client resumed its requests)
  poll(timeout)                  the messages the core sent since the last poll (long poll):
                                 ["outputs", [EngineCoreOutput], EngineStats] | ["error", id, why]
  export_request(inc, seq, id)   migration, source side: (meta, KV arrays) of a request, which ends here
  import_request(inc, seq, req, meta, arrays)   migration, destination side: the blocks, then the request
  ready()                        what the client needs once the core is up: blocks, pid, node, cores

Threads: on a machine that several replicas share, each claims its own cores (a lock file per core, held
while the process lives, so a restarted replica claims them again) and pins itself and its torch threads to
them: two replicas never run OpenMP threads on the same core.
"""
from __future__ import annotations

import concurrent.futures
import fcntl
import heapq
import logging
import os
import queue
import tempfile
import threading
import time
import traceback
import uuid

logger = logging.getLogger("kvflow")

IDLE_WAIT_S = 0.5


def claim_cores(count: int) -> list[int]:
    """Claim `count` of this process's allowed cores for it alone (the first ones no live replica on this
    machine holds); all of them when fewer are free. The claims end with the process."""
    allowed = sorted(os.sched_getaffinity(0))
    count = max(1, min(int(count), len(allowed)))
    folder = os.path.join(tempfile.gettempdir(), "kvflow-cores")
    os.makedirs(folder, exist_ok=True)
    mine, held = [], []
    for core in allowed:
        f = open(os.path.join(folder, f"core{core}.lock"), "w")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            continue
        mine.append(core)
        held.append(f)
        if len(mine) == count:
            break
    if len(mine) < count:                  # not enough free cores: share them all rather than fail
        for f in held:
            f.close()
        return allowed
    claim_cores.held = held                # keep the locks for the life of the process
    return mine


class EngineReplica:
    def __init__(self, config_json: str, index: int, cpus: float | None = None, log_level: str = "WARNING"):
        logging.basicConfig(level=log_level, format=f"%(levelname)s kvflow.replica{index}: %(message)s")
        logging.getLogger("kvflow").setLevel(log_level)
        import torch

        from kvflow.config import ResolvedConfig
        from kvflow.engine.core_process import build_core
        self.index = index
        self.cores = sorted(os.sched_getaffinity(0))
        if cpus:
            self.cores = claim_cores(max(1, round(cpus)))
            os.sched_setaffinity(0, self.cores)
            torch.set_num_threads(len(self.cores))
        rc = ResolvedConfig.from_json(config_json)
        t0 = time.perf_counter()
        core = build_core(rc)
        core.warm_up()
        self.load_s = time.perf_counter() - t0
        self._serve(core, f"replica{index}-core")

    def _serve(self, core, thread_name: str) -> None:
        """Start taking calls for `core`: this life's incarnation, the inbox and outbox, the core's thread."""
        from kvflow.cluster.kv_transfer import export_request, import_blocks
        from kvflow.engine.core_process import handle
        # imported here, not at the top: the client imports this module, and the model stack stays out of it
        self._handle, self._export, self._import = handle, export_request, import_blocks
        self.core = core
        self.incarnation = uuid.uuid4().hex   # calls sent to an earlier life of this actor are dropped
        self.inbox: queue.Queue = queue.Queue()
        self._pending: list = []           # (seq, n, item) received ahead of their turn
        self._next_seq = 0
        self._n = 0
        self.outbox: list = []
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._loop, name=thread_name, daemon=True)
        self.thread.start()

    # ---- what the client calls (Ray methods) ----------------------------------------------------------------

    def ready(self) -> dict:
        import ray
        return {"index": self.index, "num_kv_blocks": self.core.kv.num_blocks, "pid": os.getpid(),
                "node": ray.get_runtime_context().get_node_id(), "cores": self.cores, "load_s": self.load_s,
                "incarnation": self.incarnation}

    def submit(self, incarnation: str, seq: int, messages: list) -> None:
        if incarnation == self.incarnation:
            self.inbox.put((seq, "messages", messages))

    def poll(self, timeout: float = IDLE_WAIT_S) -> list:
        with self.cond:
            if not self.outbox:
                self.cond.wait(timeout)
            out, self.outbox = self.outbox, []
        return out

    def export_request(self, incarnation: str, seq: int, request_id: str):
        if incarnation != self.incarnation:
            return None, []
        done: concurrent.futures.Future = concurrent.futures.Future()
        self.inbox.put((seq, "export", (request_id, done)))
        return done.result()

    def import_request(self, incarnation: str, seq: int, request, meta: dict, arrays: list) -> None:
        if incarnation == self.incarnation:
            self.inbox.put((seq, "import", (request, meta, arrays)))

    def check_blocks(self) -> dict:
        """The block invariant, checked on the core's thread: {"ok", "error", "blocks_in_use", "requests"}."""
        done: concurrent.futures.Future = concurrent.futures.Future()
        self.inbox.put((None, "check", done))
        return done.result()

    # ---- the core's thread ----------------------------------------------------------------------------------

    def _emit(self, message: list) -> None:
        with self.cond:
            self.outbox.append(message)
            self.cond.notify_all()

    def _take(self, block: bool) -> list:
        """The items whose turn has come (in `seq` order; unsequenced ones at once)."""
        items = []
        try:
            items.append(self.inbox.get(timeout=IDLE_WAIT_S) if block else self.inbox.get_nowait())
            while True:
                items.append(self.inbox.get_nowait())
        except queue.Empty:
            pass
        ready = []
        for seq, kind, payload in items:
            if seq is None:
                ready.append((kind, payload))
            else:
                self._n += 1
                heapq.heappush(self._pending, (seq, self._n, kind, payload))
        while self._pending and self._pending[0][0] == self._next_seq:
            _, _, kind, payload = heapq.heappop(self._pending)
            self._next_seq += 1
            ready.append((kind, payload))
        return ready

    def _apply(self, kind: str, payload) -> None:
        core, handle = self.core, self._handle
        if kind == "messages":
            for msg in payload:
                self._handle_message(msg)
        elif kind == "export":
            request_id, done = payload
            try:
                done.set_result(self._export(core, request_id))
            except Exception as e:                 # the request stays where it was
                logger.exception("export of %s failed", request_id)
                done.set_exception(e)
        elif kind == "import":
            request, meta, arrays = payload
            try:
                self._import(core, meta["hashes"], arrays, meta["dtypes"])
            except Exception:                     # computed again instead
                logger.exception("import of %s's KV blocks failed", request.request_id)
            handle(core, ["add", request], self._emit)
        elif kind == "check":
            try:
                core.check_blocks()
                in_use = sum(1 for b in core.kv.pool.blocks if b.ref_count)
                payload.set_result({"ok": True, "error": None, "blocks_in_use": in_use,
                                    "requests": len(core.scheduler.requests)})
            except AssertionError as e:
                payload.set_result({"ok": False, "error": str(e), "blocks_in_use": -1,
                                    "requests": len(core.scheduler.requests)})

    def _handle_message(self, msg: list) -> None:
        self._handle(self.core, msg, self._emit)

    def _after_step(self) -> None:
        """Called on the core's thread after every turn of the loop (a prefill worker hands requests off)."""

    def _loop(self) -> None:
        core = self.core
        try:
            while True:
                items = self._take(block=not core.has_unfinished())
                for kind, payload in items:
                    self._apply(kind, payload)
                if core.has_unfinished():
                    self._emit(["outputs", core.step(), core.stats()])
                elif items:                        # e.g. the last request was aborted: report the idle state
                    self._emit(["outputs", [], core.stats()])
                self._after_step()
        except BaseException as e:                 # a replica that cannot step is restarted by Ray
            logger.error("replica %d failed: %s\n%s", self.index, e, traceback.format_exc())
            os._exit(1)
