"""The real side of a fidelity check (fidelity.py): a workload served in real time by real EngineCores, each
output's tokens stamped when the step that made them ends, as the simulator stamps them. What `kvflow bench
serve` would measure, without the HTTP and detokenization around it. Imports torch (through the engine).

  replay        one EngineCore on this thread
  replay_fleet  several, each stepping on its own thread (and its own core when there are enough), each
                request placed by kvflow's real router on loads kept as the simulator keeps them (requests
                routed and not finished; each replica's running, waiting and KV use after its last step)
  serve         either, by the number of cores, then each core's block invariant checked and its prefix
                cache emptied (the next run starts cold)
"""
from __future__ import annotations

import os
import queue
import threading
import time

from kvflow.bench.metrics import RequestResult


class _Stamps:
    """RequestResults in arrival order, filled from engine-core outputs as they come."""

    def __init__(self, requests):
        self.results = [RequestResult(success=True, prompt_len=len(r.prompt_token_ids), start_time=r.arrival_s)
                        for r in requests]
        self.last: dict[int, float] = {}

    def add(self, outputs, now: float) -> list[int]:
        """Stamp `outputs` at `now`; the indices of the requests that finished."""
        finished = []
        for o in outputs:
            k = int(o.request_id.rsplit("-", 1)[1])
            res, n = self.results[k], len(o.new_token_ids)
            if n:
                if res.output_tokens == 0:
                    res.ttft = now - res.start_time
                else:
                    res.itl.extend([(now - self.last[k]) / n] * n)
                self.last[k] = now
                res.output_tokens += n
            if o.finish_reason is not None:
                res.e2e = now - res.start_time
                finished.append(k)
        return finished


def _add(core, k: int, r) -> None:
    from kvflow.engine.wire import EngineCoreRequest
    from kvflow.sampling.params import SamplingParams
    core.add_request(EngineCoreRequest(f"fid-{k}", list(r.prompt_token_ids), SamplingParams(
        max_tokens=r.output_len, ignore_eos=True, temperature=0.0), [], r.output_len, time.monotonic()))


def _step(core, steps: list | None):
    """One EngineCore.step; appends (its shape, seconds) to `steps` (when given and it scheduled anything)."""
    sched = core.scheduler.schedule
    box: list = []
    if steps is not None:              # the step's SchedulerOutput, to read its shape
        core.scheduler.schedule = lambda: box.append(sched()) or box[0]
    t = time.perf_counter()
    try:
        outputs = core.step()
    finally:
        core.scheduler.schedule = sched
    if box and box[0].req_ids:
        steps.append((box[0].shape(), time.perf_counter() - t))
    return outputs


def replay(core, requests, steps: list | None = None):
    """Serve `requests` (SimRequests) on one EngineCore in real time: each is added at its arrival time.
    Returns (RequestResults in arrival order, duration s). Afterwards `replay.cpu_share` is the process's CPU
    time over the steps' wall time (about the engine's threads when it had the cores to itself; much less when
    other processes took them). `steps`: a list to append each step's (shape, seconds) to."""
    reqs = list(requests)
    stamps = _Stamps(reqs)
    t0 = time.perf_counter()
    i = 0
    cpu = busy = 0.0
    while i < len(reqs) or core.has_unfinished():
        now = time.perf_counter() - t0
        while i < len(reqs) and reqs[i].arrival_s <= now:
            _add(core, i, reqs[i])
            i += 1
        if not core.has_unfinished():
            time.sleep(max(reqs[i].arrival_s - now, 0.0))
            continue
        c = time.process_time()
        outputs = _step(core, steps)
        cpu += time.process_time() - c
        busy += time.perf_counter() - t0 - now
        stamps.add(outputs, time.perf_counter() - t0)
    replay.cpu_share = cpu / busy if busy else 1.0    # < 1 / threads: other processes took the cores
    return stamps.results, time.perf_counter() - t0


def replay_fleet(cores, requests, router_name: str, block_size: int, steps: list | None = None,
                 placed: list | None = None):
    """Serve `requests` on the EngineCores `cores` behind the router `router_name`; as `replay`, but each of
    `steps` is (shape, seconds, replica, start s). `placed`: a list to append each request's replica to, in
    arrival order."""
    from kvflow.cluster.router import ReplicaLoad, RouteRequest, make_router
    from kvflow.memory.kv_cache_manager import extend_block_hashes
    reqs = list(requests)
    stamps = _Stamps(reqs)
    router = make_router(router_name, len(cores), block_size=block_size)
    loads = [ReplicaLoad(i, num_kv_blocks=c.kv.num_blocks) for i, c in enumerate(cores)]
    lock = threading.Lock()             # the loads, the stamps, `steps`
    inboxes: list[queue.Queue] = [queue.Queue() for _ in cores]
    cpus = sorted(os.sched_getaffinity(0))
    t0 = time.perf_counter()

    errors: list[BaseException] = []

    def serve(i: int, core) -> None:
        try:
            loop(i, core)
        except BaseException as e:           # surfaced by the caller, after the join
            errors.append(e)

    def loop(i: int, core) -> None:
        if len(cpus) >= len(cores):
            os.sched_setaffinity(0, [cpus[i]])      # this thread only (Linux): one core per replica
        closed = False                                # every request routed
        while True:
            while True:                               # take what arrived; wait for one only with nothing to do
                try:
                    item = inboxes[i].get(block=not closed and not core.has_unfinished())
                except queue.Empty:
                    break
                if item is None:
                    closed = True
                else:
                    _add(core, *item)
            if not core.has_unfinished():
                if closed:
                    return
                continue
            mine: list = []
            start = time.perf_counter() - t0
            outputs = _step(core, mine)
            now = time.perf_counter() - t0
            s = core.scheduler
            with lock:
                if steps is not None:
                    steps.extend((shape, t, i, start) for shape, t in mine)
                finished = stamps.add(outputs, now)
                ld = loads[i]
                ld.num_running, ld.num_waiting = len(s.running), len(s.waiting)
                ld.kv_cache_usage = 1.0 - core.kv.pool.num_free / core.kv.num_blocks
                ld.num_assigned -= len(finished)

    threads = [threading.Thread(target=serve, args=(i, c), daemon=True) for i, c in enumerate(cores)]
    for t in threads:
        t.start()
    for k, r in enumerate(reqs):
        time.sleep(max(r.arrival_s - (time.perf_counter() - t0), 0.0))
        hashes = extend_block_hashes([], r.prompt_token_ids, block_size)
        with lock:
            i = router.route(RouteRequest(f"fid-{k}", hashes, len(r.prompt_token_ids), r.output_len, r.user),
                              loads)
            loads[i].num_assigned += 1
            loads[i].num_waiting += 1
        if placed is not None:
            placed.append(i)
        inboxes[i].put((k, r))
    for box in inboxes:
        box.put(None)
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return stamps.results, time.perf_counter() - t0


def serve(cores, requests, router_name: str, block_size: int, steps: list | None = None,
          placed: list | None = None):
    """`requests` served by `cores`: one EngineCore by `replay`, several by `replay_fleet` behind `router_name`
    (`placed` then gets each request's replica). Afterwards every core's blocks are free, cached or held
    (check_blocks) and its prefix cache is emptied. Returns (RequestResults in arrival order, duration s)."""
    if len(cores) == 1:
        out = replay(cores[0], requests, steps)
    else:
        out = replay_fleet(cores, requests, router_name, block_size, steps, placed)
    for core in cores:
        core.check_blocks()
        core.reset_prefix_cache()
    return out
