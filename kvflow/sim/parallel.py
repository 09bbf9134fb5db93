"""A simulation split over worker processes: each worker owns a share of the replicas and runs their events;
the router runs in the parent, on the loads the workers last reported (`kvflow sim --workers N`).

A worker's error is raised in the parent as the same exception (its traceback a note), as in one process.

Replicas only meet at the router, so the run goes in batches of arrivals. A batch starts at the next arrival
time T and holds the arrivals before T + sync_s. First every worker runs its replicas' events before T and
reports the loads that changed (and which requests finished, for a router with state); then the router places
the batch's requests on those loads, counting what it places as it goes (SimReplica.count_placed, and the
tokens outstanding that Simulation._route adds). That is the real cluster client's position too
(kvflow/cluster/client.py): it routes on the load each replica reported after its last step plus
its own count of what it sent since. So a request sees the loads of up to sync_s before it arrives; as sync_s
goes to 0 the run becomes the one-process simulation's.

The result does not depend on the number of workers: `workers=1` runs the same protocol in this process
(tests compare it with two). Each worker builds its own Simulation and checks the block invariant of its
replicas at the end. Colocated replicas only: P/D and serverless runs stay in one process.
"""
from __future__ import annotations

import gc
import math
import multiprocessing
import pickle
import traceback

from kvflow.cluster.router import RouteRequest
from kvflow.config import EngineConfig
from kvflow.memory.kv_cache_manager import extend_block_hashes
from kvflow.sim.cluster import Simulation, without_cyclic_gc
from kvflow.sim.cost_model import HardwareProfile
from kvflow.sim.report import Record, Recorder

SYNC_S = 1e-3       # default batch width: a few H100 decode steps' worth of staleness at most
LOAD_FIELDS = ("num_running", "num_waiting", "kv_cache_usage", "num_assigned", "outstanding_tokens")


class _Changes:
    """Stands in for the pool's LoadTable in a worker: it only notes which replicas' loads changed."""

    def __init__(self):
        self.changed: set[int] = set()

    def update(self, j: int) -> None:
        self.changed.add(j)


class _FinishLog:
    """Stands in for the router in a worker: the parent's router hears of finished requests at the next sync."""

    def __init__(self):
        self.finished: list[tuple[str, int]] = []

    def on_finished(self, request_id: str, replica: int) -> None:
        self.finished.append((request_id, replica))


class Shard:
    """Replicas `owned` of a Simulation of its own: one worker's part of the run."""

    def __init__(self, sim: Simulation, owned: range):
        self.sim, self.owned = sim, owned
        sim.rec = Recorder(sim.rec.keep_itl, sim.rec.bin_s)      # this shard's requests and busy time only
        self.changes, self.log = _Changes(), _FinishLog()
        sim.prefill.router = self.log
        for j in owned:
            sim.prefill.replicas[j].loads = self.changes

    def run(self, arrivals: list[tuple], until: float) -> tuple[list[tuple], list[tuple[str, int]]]:
        """Take routed arrivals, run every event before `until`; (changed loads, finished requests)."""
        sim = self.sim
        for i, blob in arrivals:
            rid, arrival, prompt, max_tokens, user, itl, hashes = pickle.loads(blob)
            rec = sim.rec.records[rid] = Record(rid, arrival, prompt, len(prompt), max_tokens, user,
                                                itl=[] if itl else None)
            sim._push_arrival(arrival, rec, (i, hashes))
        sim.advance(until)
        reps = sim.prefill.replicas
        loads = []
        for j in self.changes.changed:
            ld = reps[j].load
            loads.append((j, ld.num_running, ld.num_waiting, ld.kv_cache_usage, ld.num_assigned,
                          ld.outstanding_tokens, dict(ld.extra)))
        self.changes.changed.clear()
        finished, self.log.finished = self.log.finished, []
        return loads, finished

    def result(self) -> dict:
        """The shard's share of the report, after its last event; asserts its replicas' block invariant."""
        sim, rec = self.sim, self.sim.rec
        assert not rec.records, f"{len(rec.records)} requests were never answered"
        reps = [sim.prefill.replicas[j] for j in self.owned]
        for r in reps:
            r.check()
        return {"rows": rec.rows, "itls": rec.itls, "bins": rec.bins, "end_s": sim.now, "transfer_s": rec.transfer_s,
                "counters": [(r.index, r.scheduler.num_preemptions, r.runner.num_steps) for r in reps]}


def _serve(conn, make_sim, owned: range) -> None:
    """A worker process: one Shard, driven over `conn` until the parent sends None."""
    # The cyclic collector is off (as cluster.without_cyclic_gc) for the process's life: turned on again at the
    # end, it would rescan everything the run made (over a second of a worker's time at 1,000 x 100,000).
    gc.disable()
    try:
        shard = Shard(make_sim(), owned)
        while (msg := conn.recv()) is not None:
            conn.send(("ok", shard.run(*msg)))
        conn.send(("ok", shard.result()))
    except EOFError:                   # the parent is gone (another worker failed)
        pass
    except BaseException as e:         # the parent raises it, with the worker's traceback as a note
        try:
            conn.send(("error", (e, traceback.format_exc())))
        except Exception:              # (an exception that does not pickle: its traceback alone)
            conn.send(("error", (None, traceback.format_exc())))
    finally:
        conn.close()


class _Local:
    """A shard in this process, behind the same calls as a worker's pipe."""

    def __init__(self, make_sim, owned: range):
        self.shard = Shard(make_sim(), owned)
        self.answer = None

    def send(self, msg) -> None:
        self.answer = self.shard.result() if msg is None else self.shard.run(*msg)

    def recv(self):
        return "ok", self.answer


def simulate_parallel(config: EngineConfig, profile: HardwareProfile, requests, workers: int = 2,
                      sync_s: float = SYNC_S, keep_itl: int = 20000, bin_s: float | None = None,
                      step_noise: float = 0.0,
                      spec_acceptance: float | list[float] | None = None,
                      spec_propose_rate: float | list[float] | None = None) -> tuple[Simulation, Recorder]:
    """As cluster.simulate, over `workers` processes (1: the same protocol in this process). The Simulation
    returned is the parent's: its router, and its replicas as the router saw them (their loads as last
    reported, their step and preemption counts as the workers ended)."""
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if not sync_s > 0:
        raise ValueError(f"sync_s must be positive, got {sync_s}")
    if config.scheduler.length_predictor not in (None, "online"):
        raise ValueError("length_predictor: a predictor file is simulated in one process (its features come from "
                         "the model, run in that process): leave out --workers")

    def make_sim() -> Simulation:
        return Simulation(config, profile, keep_itl=keep_itl, bin_s=bin_s, step_noise=step_noise,
                          spec_acceptance=spec_acceptance, spec_propose_rate=spec_propose_rate)

    sim = make_sim()
    if sim.pd or sim.serverless:
        raise ValueError("workers > 1 simulates colocated replicas only: run P/D and serverless with workers=1")
    n, m = len(sim.prefill.replicas), profile.replicas_per_machine   # a machine's replicas share a worker
    machines = -(-n // m)
    workers = min(workers, machines)
    cuts = [min(k * machines // workers * m, n) for k in range(workers + 1)]
    shares = [range(cuts[k], cuts[k + 1]) for k in range(workers)]       # (dealt round: no faster)
    owner = [k for k, share in enumerate(shares) for _ in share]
    procs, conns = [], []
    if workers == 1:
        conns.append(_Local(make_sim, shares[0]))
    else:
        ctx = multiprocessing.get_context("fork")     # the workers inherit config, profile and imports
        for share in shares:
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_serve, args=(child, make_sim, share), daemon=True)
            p.start()
            child.close()
            procs.append(p)
            conns.append(parent)
    try:
        with without_cyclic_gc():
            parts = _drive(sim, requests, sync_s, owner, conns)
    finally:
        for c in conns if procs else ():
            c.close()                  # a worker still waiting for a message gets EOF and ends
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    return sim, _merge(sim, parts)


def _send(conns, msgs) -> None:
    for c, m in zip(conns, msgs):
        c.send(m)


def _receive(conns) -> list:
    answers = []
    for c in conns:
        status, value = c.recv()
        if status != "ok":             # the worker's exception (the same error as in one process)
            exc, tb = value
            if exc is None:
                raise RuntimeError(f"a simulation worker failed:\n{tb}")
            exc.add_note(f"in a simulation worker:\n{tb}")
            raise exc
        answers.append(value)
    return answers


def _drive(sim: Simulation, requests, sync_s: float, owner: list[int], conns) -> list[dict]:
    """The parent's loop: while the workers run up to the next batch, it reads, hashes and pickles that batch
    (nothing of which depends on the loads); then it applies their reports and routes the batch. (The workers
    wait while it routes: what it does there is only what needs the loads.)"""
    pool, rec, bs = sim.prefill, sim.rec, sim.spec.block_size
    reps, model_len = pool.replicas, sim.spec.max_model_len
    it = iter(requests)
    nxt = next(it, None)
    routed: list[list[tuple]] = [[] for _ in conns]
    while True:
        until = nxt.arrival_s if nxt is not None else math.inf
        _send(conns, [(batch, until) for batch in routed])
        batch = []
        while nxt is not None and nxt.arrival_s < until + sync_s:
            r = rec.add(nxt, model_len)
            nxt = next(it, None)
            if not r.error:            # (an error's row is written; it is never routed)
                del rec.records[r.rid]             # the worker keeps it from here
                hashes = extend_block_hashes([], r.prompt, bs)
                blob = pickle.dumps((r.rid, r.arrival, r.prompt, r.max_tokens, r.user, r.itl is not None, hashes),
                                    pickle.HIGHEST_PROTOCOL)
                batch.append((r, hashes, blob))
        for loads, finished in _receive(conns):
            for j, running, waiting, kv, assigned, outstanding, extra in loads:
                ld = reps[j].load
                ld.num_running, ld.num_waiting, ld.kv_cache_usage = running, waiting, kv
                ld.num_assigned, ld.outstanding_tokens, ld.extra = assigned, outstanding, extra
                pool.loads.update(j)
            if pool.router is not None:
                for rid, j in finished:
                    pool.router.on_finished(rid, j)
        if until == math.inf:
            _send(conns, [None] * len(conns))
            return _receive(conns)
        routed = [[] for _ in conns]
        for r, hashes, blob in batch:
            i = pool.choose(RouteRequest(r.rid, hashes, r.prompt_len, r.max_tokens, r.user))
            reps[i].load.outstanding_tokens += r.prompt_len + r.max_tokens     # as Simulation._route counts it
            reps[i].count_placed(r.prompt_len)                                # and SimReplica.add
            routed[owner[i]].append((i, blob))


def _merge(sim: Simulation, parts: list[dict]) -> Recorder:
    """The parent's Recorder (its error rows, replicas up) with the workers' rows, ITLs and busy time."""
    rec = sim.rec
    for part in parts:
        rec.rows += part["rows"]
        rec.itls += part["itls"]
        rec.transfer_s += part["transfer_s"]
        for k, b in part["bins"].items():
            mine = rec._bin(k)
            for slot in range(4):      # busy s, KV usage sum, running sum, steps; replicas up is the parent's
                mine[slot] += b[slot]
        for j, preemptions, steps in part["counters"]:
            r = sim.prefill.replicas[j]
            r.scheduler.num_preemptions, r.runner.num_steps = preemptions, steps
    rec.rows.sort(key=lambda row: (row[0] + row[4], row))     # finish order, whatever the number of workers
    rec.itls.sort()
    sim.now = max((p["end_s"] for p in parts), default=0.0)
    rec.finish(sim.now)
    return rec
