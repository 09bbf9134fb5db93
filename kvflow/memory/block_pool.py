"""The pool of KV blocks: free list in LRU order, reference counts, and the prefix-cache index.

Every block is in exactly one of three states, which `check()` asserts:
  free      ref_count == 0, no hash          (in the free queue, or never handed out yet)
  cached    ref_count == 0, hash registered  (in the free queue too: reusable, evicted LRU when taken)
  in use    ref_count  > 0                   (owned by one or more live requests)
"""
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(eq=False, slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None


class BlockPool:
    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        # Blocks never handed out are not queued, nor (until `blocks` is read) made: a simulated fleet of 1,000
        # replicas would otherwise build and queue millions of them up front (~0.6 MB per replica), most never
        # used. They are the ids from `num_fresh` on, taken in order before the queue (as if at its front).
        self._blocks: list[Block] = []
        self.num_fresh = 0                       # ids below it have been handed out at least once
        self.free_queue: OrderedDict[int, None] = OrderedDict()   # released blocks; front = evict first
        self.cached: dict[int, Block] = {}       # block hash -> block holding that content
        self.num_evictions = 0
        self.evicted: list[tuple[int, int]] = []   # (block id, hash) evicted since last taken (disk tier)

    @property
    def blocks(self) -> list[Block]:
        """Every block, by id."""
        self._blocks.extend(Block(i) for i in range(len(self._blocks), self.num_blocks))
        return self._blocks

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (free or cached-but-unreferenced)."""
        return self.num_blocks - self.num_fresh + len(self.free_queue)

    def allocate(self, n: int) -> list[Block]:
        if n > self.num_free:
            raise RuntimeError(f"asked for {n} blocks with {self.num_free} free")
        out = []
        blocks = self._blocks
        for _ in range(n):
            if self.num_fresh < self.num_blocks:     # never handed out before: the next id (made if need be)
                block_id = self.num_fresh
                self.num_fresh += 1
                if block_id == len(blocks):
                    blocks.append(Block(block_id))
            else:
                block_id = self.free_queue.popitem(last=False)[0]
            block = blocks[block_id]
            if block.block_hash is not None:     # evict its cached content
                if self.cached.get(block.block_hash) is block:
                    del self.cached[block.block_hash]
                    self.evicted.append((block.block_id, block.block_hash))
                block.block_hash = None
                self.num_evictions += 1
            block.ref_count = 1
            out.append(block)
        return out

    def touch(self, blocks: list[Block]) -> None:
        """Take a reference on blocks found in the prefix cache (pulling unreferenced ones off the free queue)."""
        for block in blocks:
            if block.ref_count == 0:
                del self.free_queue[block.block_id]
            block.ref_count += 1

    def release(self, blocks: list[Block]) -> None:
        """Drop one reference on each block; pass them tail first, so tails are evicted before prefixes."""
        for block in blocks:
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block.block_id} released twice"
            if block.ref_count == 0:
                self.free_queue[block.block_id] = None

    def lookup(self, block_hash: int) -> Block | None:
        return self.cached.get(block_hash)

    def cache(self, block: Block, block_hash: int) -> None:
        """Register a full block under the hash of its content (first writer wins on duplicates)."""
        if block.block_hash is None and block_hash not in self.cached:
            block.block_hash = block_hash
            self.cached[block_hash] = block

    def reset_prefix_cache(self) -> None:
        for block in self.cached.values():
            block.block_hash = None
        self.cached.clear()

    def check(self, live_refs: dict[int, int] | None = None) -> None:
        """Assert the pool's invariants; live_refs (block id -> references held by live requests) when given.
        Blocks never handed out are not made for it: the free queue must hold exactly the released ones
        (each made block is checked, so the count says it)."""
        num_queued = 0
        for block in self._blocks:
            in_queue = block.block_id in self.free_queue
            num_queued += in_queue
            if block.block_id >= self.num_fresh:
                assert not in_queue and block.ref_count == 0 and block.block_hash is None, \
                    f"block {block.block_id} was never handed out, but is queued or used"
                continue
            assert (block.ref_count == 0) == in_queue, f"block {block.block_id}: ref {block.ref_count}, queued {in_queue}"
            if block.block_hash is not None:
                assert self.cached.get(block.block_hash) is block, f"block {block.block_id}: stale hash"
            if live_refs is not None:
                assert block.ref_count == live_refs.get(block.block_id, 0), \
                    f"block {block.block_id}: ref {block.ref_count}, held by requests {live_refs.get(block.block_id, 0)}"
        assert len(self.free_queue) == num_queued, "the free queue is off"
        assert all(b.block_hash == h for h, b in self.cached.items())
