"""cache-aware: send a request where its prompt's prefix is already cached, unless that would overload the
replica (SGLang's router: cache-aware routing with a balance threshold; Preble: global prefix tree, load
balance and hot-prefix replication).

Per request:
  1. Look the prompt's chained block hashes up in the global PrefixIndex (kvflow/cluster/prefix_index.py):
     the replicas holding the longest run of leading blocks. No hit at all: the least-loaded replica.
  2. Among those, the least loaded; if it is overloaded relative to the least-loaded healthy replica
     (SGLang's rule: load > min + balance_abs_threshold and load > min * balance_rel_threshold), the least
     loaded instead: recomputing the prefix there costs less than queueing behind the others.
  3. Hot prefixes (Preble's replication): the router remembers, over the last `hot_window` routed requests,
     which replica each prefix (keyed by its first block's hash: a system prompt, a few-shot header) went
     to. When the prefix is hot (at least `hot_min_count` of them) and the chosen replica took more than
     `hot_share` of them while the least-loaded replica is at least `hot_load_gap` less loaded, the request
     goes to the least-loaded one: the prefix now lives on both, and rule 2 spreads it from then on.
  4. The chosen replica is recorded as holding every block of the prompt, in its LRU model of capacity
     `ReplicaLoad.num_kv_blocks`, capped by `max_blocks_per_replica` (the bound on the router's memory:
     about 100 bytes per (block, replica)); either 0 means no limit from it, both 0 an unbounded model.
Loads are `ReplicaLoad.load`; ties go in rotation. `on_replica_down`/`on_replica_up` forget the replica's
blocks. The client must send `block_hashes` computed exactly as the replicas' engines hash their blocks
(same block size, `hash_block` chain), or nothing ever hits.
"""
from __future__ import annotations

from collections import deque

from kvflow.cluster.prefix_index import PrefixIndex
from kvflow.cluster.router import ROUTERS, ReplicaLoad, RouteRequest, Router
from kvflow.cluster.routers.least_load import DEFAULT_BALANCE_ABS, DEFAULT_BALANCE_REL, overloaded, scan


@ROUTERS.register("cache-aware")
class CacheAwareRouter(Router):
    def __init__(self, num_replicas: int, balance_abs_threshold: float = DEFAULT_BALANCE_ABS,
                 balance_rel_threshold: float = DEFAULT_BALANCE_REL, hot_window: int = 1000,
                 hot_min_count: int = 32, hot_share: float = 0.5, hot_load_gap: float = 2.0,
                 max_blocks_per_replica: int = 1 << 17, **options):
        super().__init__(num_replicas, **options)
        if hot_window < 1 or not 0.0 < hot_share <= 1.0:
            raise ValueError(f"hot_window must be >= 1 and hot_share in (0, 1], got {hot_window}, {hot_share}")
        self.abs_threshold = float(balance_abs_threshold)
        self.rel_threshold = float(balance_rel_threshold)
        self.hot_window, self.hot_min_count = int(hot_window), int(hot_min_count)
        self.hot_share, self.hot_load_gap = float(hot_share), float(hot_load_gap)
        self.max_blocks_per_replica = int(max_blocks_per_replica)
        self.index = PrefixIndex(num_replicas, self.max_blocks_per_replica)
        self._window: deque[tuple[int, int]] = deque()       # (prefix key, replica) of recent requests
        self._key_count: dict[int, int] = {}                  # prefix key -> requests in the window
        self._pair_count: dict[tuple[int, int], int] = {}     # (prefix key, replica) -> requests in it
        self._cursor = 0
        self.num_hits = self.num_balanced = self.num_replicated = 0   # decisions, for stats and tests

    def route(self, req: RouteRequest, loads: list[ReplicaLoad]) -> int:
        values, least, unhealthy = scan(loads, self._cursor)
        hashes = req.block_hashes
        choice = least
        length, holders = self.index.match(hashes, unhealthy) if hashes else (0, 0)
        if length:
            self.num_hits += 1
            cand, cand_v = -1, None
            while holders:                              # the least loaded of those with the longest hit
                low = holders & -holders
                j = low.bit_length() - 1
                holders ^= low
                if j < len(values) and values[j] is not None and (cand < 0 or values[j] < cand_v):
                    cand, cand_v = j, values[j]
            if cand >= 0:
                min_v = values[least]
                if overloaded(cand_v, min_v, self.abs_threshold, self.rel_threshold):
                    self.num_balanced += 1
                elif cand != least and self._is_hot_on(hashes[0], cand) and cand_v - min_v >= self.hot_load_gap:
                    self.num_replicated += 1
                else:
                    choice = cand
        if choice == least:
            self._cursor = least + 1
        if hashes:
            self._record(hashes[0], choice)
            ld = loads[choice]
            caps = [c for c in (ld.num_kv_blocks, self.max_blocks_per_replica) if c > 0]
            self.index.set_capacity(choice, min(caps) if caps else 0)
            self.index.insert(choice, hashes)
        return loads[choice].index

    def _is_hot_on(self, key: int, replica: int) -> bool:
        total = self._key_count.get(key, 0)
        return total >= self.hot_min_count and self._pair_count.get((key, replica), 0) > self.hot_share * total

    def _record(self, key: int, replica: int) -> None:
        self._window.append((key, replica))
        self._key_count[key] = self._key_count.get(key, 0) + 1
        pair = (key, replica)
        self._pair_count[pair] = self._pair_count.get(pair, 0) + 1
        if len(self._window) > self.hot_window:
            old = self._window.popleft()
            self._dec(self._key_count, old[0])
            self._dec(self._pair_count, old)

    @staticmethod
    def _dec(counts: dict, key) -> None:
        n = counts[key] - 1
        if n:
            counts[key] = n
        else:
            del counts[key]

    def on_replica_down(self, replica: int) -> None:
        self.index.clear(replica)

    def on_replica_up(self, replica: int) -> None:
        self.index.clear(replica)

    def stats(self) -> dict:
        """Index size and decision counts (for benchmarks and logs)."""
        return {**self.index.stats(), "window": len(self._window), "hits": self.num_hits,
                "balanced": self.num_balanced, "replicated": self.num_replicated}
