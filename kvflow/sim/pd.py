"""Mooncake's two P/D features, as the simulator runs them (kvflow/sim/cluster.py calls these):

  KVPool          the shared KV pool (`kv_pool`, `kv_pool_bytes`): kvflow/memory/host_store.py's HostKVStore
                  without the arrays. Keyed by the engine's chained block hashes, least recently used out.
                  A prefill worker publishes its prompt's full blocks at the hand-off (its loop copies them
                  out; they land in the pool after crossing the link), and reads the blocks the pool holds
                  beyond its own prefix hit before a new request's prefill (kvflow/disagg/worker.py:
                  _publish, _read_pool).
  ElasticRoles    `pd_elastic` (SplitWise, TetriInfer): DisaggClient's role switches by kvflow/disagg/elastic.py's
                  rule, on the simulation's clock. Every worker is in both pools; only its role's router sees it.
  EarlyRejection  `early_rejection`: kvflow/disagg/client.py's DisaggClient._admit. Before any work, a request
                  needs ceil((prompt + expected output) / block_size) decode KV blocks; it is refused (503) when
                  the requests in flight plus it would need more than the decode workers hold.
"""
from __future__ import annotations

import heapq
import math
from collections import OrderedDict

from kvflow.disagg.elastic import RoleSwitch, choose_switch
from kvflow.predict.base import frontend_predictor, make_predictor


class KVPool:
    """The pool's bookkeeping: which block hashes it holds, in LRU order (oldest first), at most `capacity`.
    HostKVStore evicts by bytes; every block has the spec's block_bytes, so that is a count of blocks. A put
    is on its way (`in_flight`) until it lands."""

    def __init__(self, capacity: int):
        if capacity < 0:
            raise ValueError(f"kv_pool capacity must be a non-negative number of blocks, got {capacity!r}")
        self.capacity = capacity
        self.blocks: OrderedDict[int, None] = OrderedDict()
        self.published: dict[int, set[int]] = {}   # prefill replica -> hashes it put (it never puts them again)
        self.in_flight: list[tuple[float, int, list[int]]] = []    # (lands at, order, hashes), a heap
        self.puts = self.lookups = self.hit_blocks = self.evictions = self.num_puts = 0
        self.load_s = 0.0                          # seconds prefill workers waited on reads
        self.put_s = 0.0                           # seconds prefill workers spent copying blocks out to put

    def publish(self, replica: int, hashes: list[int]) -> list[int]:
        """A prefill worker's hand-off (worker._publish): the prompt's full blocks it has not put before. It puts
        them now (put()) and never again."""
        mine = self.published.setdefault(replica, set())
        todo = [h for h in hashes if h not in mine]
        mine.update(todo)
        return todo

    def put(self, hashes: list[int], lands_at: float) -> None:
        """A put of `hashes` (the real one: a fire-and-forget actor call, its arrays crossing the link) that
        reaches the pool at `lands_at`: no lookup finds them before."""
        if hashes:
            self.num_puts += 1
            heapq.heappush(self.in_flight, (lands_at, self.num_puts, hashes))

    def land(self, now: float) -> None:
        """The puts that reached the pool by `now` go in, in the order they landed (HostKVStore.put: blocks
        already held move to the newest end; the oldest go while over capacity)."""
        while self.in_flight and self.in_flight[0][0] <= now:
            new = 0
            for h in heapq.heappop(self.in_flight)[2]:
                if h in self.blocks:
                    self.blocks.move_to_end(h)
                else:
                    self.blocks[h] = None
                    new += 1
            while len(self.blocks) > self.capacity:
                self.blocks.popitem(last=False)
                self.evictions += 1
            self.puts += new

    def get(self, hashes: list[int], skip: int, now: float = math.inf) -> list[int]:
        """HostKVStore.get at `now`: the longest held prefix of the chain (a walk from block 0 that stops at the
        first gap), less the first `skip` blocks the caller holds; those returned become the most recently used."""
        self.land(now)
        self.lookups += 1
        n = 0
        for h in hashes:
            if h not in self.blocks:
                break
            n += 1
        keys = hashes[skip:n]
        for h in keys:
            self.blocks.move_to_end(h)
        self.hit_blocks += len(keys)
        return keys

    def stats(self) -> dict:
        """Its counts once every put has landed (at a simulation's end)."""
        self.land(math.inf)
        return {"blocks": len(self.blocks), "capacity_blocks": self.capacity, "puts": self.puts,
                "lookups": self.lookups, "hit_blocks": self.hit_blocks, "evictions": self.evictions,
                "load_s": self.load_s, "put_s": self.put_s}


def read_pool(pool: KVPool, kv, hashes: list[int], now: float, cost, block_bytes: int) -> float:
    """worker._read_pool at `now`, before a new request's prefill on a worker whose KV manager is `kv`: the
    pool's blocks beyond the worker's own leading prefix hit are adopted into its prefix cache (import_blocks:
    into at most half its free blocks), where the scheduler finds them as a prefix hit; all it reads are moved,
    whether or not the cache had room. A synchronous get on the worker's loop: the seconds its next step waits
    (the bytes cross the P/D link, cost.transfer_seconds, as a hand-off's do)."""
    local = kv.cached_prefix(hashes)
    if local == len(hashes):
        return 0.0
    keys = pool.get(hashes, local, now)
    if not keys:
        return 0.0
    kv.adopt_blocks(keys, kv.pool.num_free // 2)
    load_s = cost.transfer_seconds(len(keys) * block_bytes)
    pool.load_s += load_s
    return load_s


def put_pool(pool: KVPool, replica: int, hashes: list[int], now: float, cost, block_bytes: int) -> float:
    """worker._publish at a hand-off at `now`: the worker's loop copies the blocks it has not put before out of
    its cache, and they land in the pool after crossing the link. The copy's seconds (the worker's next step
    and the hand-off wait for it)."""
    todo = pool.publish(replica, hashes)
    if not todo:
        return 0.0
    nbytes = len(todo) * block_bytes
    put_s = cost.block_op_seconds("swap_out", nbytes)
    pool.put(todo, now + put_s + cost.transfer_seconds(nbytes))
    pool.put_s += put_s
    return put_s


class EarlyRejection:
    """DisaggClient._admit and _forget: the decode KV blocks the admitted requests are predicted to hold."""

    def __init__(self, block_size: int, length_predictor: str | None):
        self.block_size = block_size
        # the frontend's predictor (fleet.frontend_predictor: a file's reads model features, so the online one).
        # It learns only from requests that end by a stop token; simulated requests end at max_tokens, so it
        # keeps its prior, as it would.
        self.predictor = frontend_predictor(make_predictor(length_predictor))
        self.need: dict[str, int] = {}
        self.needed_blocks = 0
        self.rejected = 0

    def admit(self, rid: str, prompt_len: int, max_tokens: int, user: str | None, capacity: int) -> str:
        """Admit the request (""), or the reason it is refused. `capacity`: the decode workers' KV blocks."""
        predicted = self.predictor.predict(prompt_len, user, {}).mean(cap=max_tokens)   # client._route_request
        expected = min(max_tokens, predicted or max_tokens)
        need = math.ceil((prompt_len + expected) / self.block_size)
        if self.needed_blocks + need > capacity:
            self.rejected += 1
            return (f"early rejection (503): the decode workers have no KV memory for this request: it needs "
                    f"about {need} blocks, {max(0, capacity - self.needed_blocks)} of {capacity} are free of the "
                    f"requests in flight")
        self.need[rid] = need
        self.needed_blocks += need
        return ""

    def forget(self, rid: str) -> None:
        """The request finished: its blocks are no longer needed."""
        self.needed_blocks -= self.need.pop(rid, 0)


class ElasticRoles:
    """pd_elastic: the prefill and decode pools hold the same workers; a worker is healthy only in the pool of
    its role. As in DisaggClient a role is a label: a worker that switches finishes what it holds (a request
    hands off when its own prefill phase ends, whatever the worker's role is by then) and gets the other
    phase's requests from then on. The rule is checked after every step's outputs, as the client checks it
    as outputs arrive."""

    def __init__(self, prefill, decode, num_prefill: int, sched_opts):
        self.prefill, self.decode, self.sched_opts = prefill, decode, sched_opts
        self.switches: list[RoleSwitch] = []
        self.last = 0.0
        for i in range(len(prefill.replicas)):
            self.set_role(i, "prefill" if i < num_prefill else "decode")

    def set_role(self, i: int, role: str) -> None:
        self.prefill.replicas[i].role = role
        mine, other = (self.prefill, self.decode) if role == "prefill" else (self.decode, self.prefill)
        other.set_ready(i, False)
        mine.set_ready(i, True)          # (last: the worker then reports its load to this pool's table)

    def check(self, now: float) -> None:
        reps = self.prefill.replicas
        switch = choose_switch([r.role for r in reps], [r.load for r in reps], self.sched_opts, now - self.last)
        if switch is not None:
            self.set_role(switch.worker, switch.new)
            self.last = switch.time = now
            self.switches.append(switch)
