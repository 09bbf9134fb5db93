"""The cache-aware router's global prefix index: which replica holds which prompt blocks.

Keys are the engine's chained block hashes (`hash_block` in kvflow/memory/kv_cache_manager.py): equal hash
at position i means equal whole prefix up to block i, so a replica's hit for a prompt is the run of leading
hashes it holds, and no token is ever compared. This plays the role of SGLang router's approximate radix
tree and Preble's global prefix tree, flattened by the chaining.

State:
  holders   hash -> bitmask of the replicas that hold the block (bit r = replica r)
  lru[r]    replica r's blocks, least recently used first (an OrderedDict used as an ordered set), with
            capacity[r] blocks (its `num_kv_blocks`; 0 = unbounded): inserting past it forgets the least
            recently used blocks, as the replica's own prefix cache would have evicted them.
Memory is one `holders` entry per distinct block plus one LRU entry per (block, replica): bounded by the
sum of the capacities. A lookup is O(prompt blocks) (one dict probe and one AND each); an insert is
O(prompt blocks) on the one replica chosen; forgetting a replica is O(its blocks).
"""
from __future__ import annotations

from collections import OrderedDict


class PrefixIndex:
    def __init__(self, num_replicas: int = 0, capacity: int = 0):
        self.default_capacity = capacity
        self.holders: dict[int, int] = {}
        self.lru: list[OrderedDict[int, None]] = []
        self.capacity: list[int] = []
        self._ensure(num_replicas - 1)

    def _ensure(self, replica: int) -> None:
        while len(self.lru) <= replica:
            self.lru.append(OrderedDict())
            self.capacity.append(self.default_capacity)

    def match(self, hashes: list[int], exclude: int = 0) -> tuple[int, int]:
        """(length, replicas): the longest run of leading `hashes` that some replica outside the bitmask
        `exclude` holds, and the bitmask of the replicas holding all of it ((0, 0) when none holds even
        the first block)."""
        holders = self.holders
        cur, length = ~exclude, 0    # ~0 == -1: every replica
        for h in hashes:
            m = holders.get(h, 0) & cur
            if not m:
                break
            cur, length = m, length + 1
        return (length, cur) if length else (0, 0)

    def hit_length(self, hashes: list[int], replica: int) -> int:
        """How many leading blocks of `hashes` `replica` holds."""
        bit, n = 1 << replica, 0
        for h in hashes:
            if not self.holders.get(h, 0) & bit:
                break
            n += 1
        return n

    def set_capacity(self, replica: int, blocks: int) -> None:
        """Replica's cache size in blocks (0: unbounded); shrinking it evicts now."""
        self._ensure(replica)
        if blocks != self.capacity[replica]:
            self.capacity[replica] = blocks
            self._evict(replica)

    def insert(self, replica: int, hashes: list[int]) -> None:
        """`replica` now holds every block of `hashes`: added or made most recent. They are touched last
        block first, so that under pressure a prompt's tail is forgotten before its head, as a prefix
        cache evicts (a head without its tail still gives hits; a tail without its head gives none)."""
        self._ensure(replica)
        bit, lru, holders = 1 << replica, self.lru[replica], self.holders
        for h in reversed(hashes):
            if h in lru:
                lru.move_to_end(h)
            else:
                lru[h] = None
                holders[h] = holders.get(h, 0) | bit
        self._evict(replica)

    def _evict(self, replica: int) -> None:
        cap, lru = self.capacity[replica], self.lru[replica]
        if not cap:
            return
        bit, holders = 1 << replica, self.holders
        while len(lru) > cap:
            h, _ = lru.popitem(last=False)
            m = holders[h] ^ bit
            if m:
                holders[h] = m
            else:
                del holders[h]

    def clear(self, replica: int) -> None:
        """Forget everything `replica` held (it went down, or came back empty)."""
        if replica >= len(self.lru):
            return
        bit, holders = 1 << replica, self.holders
        for h in self.lru[replica]:
            m = holders[h] ^ bit
            if m:
                holders[h] = m
            else:
                del holders[h]
        self.lru[replica] = OrderedDict()

    def num_blocks(self, replica: int) -> int:
        return len(self.lru[replica]) if replica < len(self.lru) else 0

    def stats(self) -> dict:
        """distinct blocks indexed, (block, replica) entries, and both summed."""
        pairs = sum(len(od) for od in self.lru)
        return {"blocks": len(self.holders), "replica_entries": pairs, "entries": len(self.holders) + pairs}
