"""Per-request KV block tables on top of the block pool, with automatic prefix caching, forks and tiers.

Everything is kept by request id, a request's state on one object (`RequestKV`: its block table, chained
block hashes, cached and sent counts), swap tables apart. A full block is
identified by a chained hash of its tokens (hash of the parent block's hash and its own token ids), so
equal hashes mean equal whole prefixes. Full blocks are registered in the pool's cache as soon as they are
computed; a new request reuses the longest run of cached blocks that starts its prompt, continues it from
the disk tier, and only computes the rest.

Moves of KV data are typed `BlockOp`s, queued in the order they must be applied (`take_ops`). The runner
learns each request's table incrementally (`block_update`). No torch here.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from hashlib import blake2b

from kvflow.memory.block_pool import Block, BlockPool
from kvflow.memory.swap_tier import SwapTier
from kvflow.memory.tiers import KVTier
from kvflow.request import Request
from kvflow.step import BlockOp


_PACKERS: dict[int, struct.Struct] = {}     # "<{n}i" by n, compiled once rather than per call
_PARENT = struct.Struct("<q")
_BLAKE2B_8 = blake2b(digest_size=8)         # copied for each block: cheaper than a new one's keyword arguments


def _pack_tokens(token_ids: list[int]) -> bytes:
    packer = _PACKERS.get(len(token_ids))
    if packer is None:
        packer = _PACKERS[len(token_ids)] = struct.Struct(f"<{len(token_ids)}i")
    return packer.pack(*token_ids)


def _key(parent_hash: int, packed_tokens: bytes) -> int:
    h = _BLAKE2B_8.copy()
    h.update(_PARENT.pack(parent_hash))
    h.update(packed_tokens)
    return int.from_bytes(h.digest(), "little", signed=True)


def hash_block(parent_hash: int | None, token_ids: list[int]) -> int:
    """The block's key: an 8-byte BLAKE2b of its parent's key (0 for the first block) and its token ids,
    little-endian int64 then int32s, read as a signed little-endian int."""
    return _key(parent_hash or 0, _pack_tokens(token_ids))


def extend_block_hashes(hashes: list[int], token_ids: list[int], block_size: int) -> list[int]:
    """Extend `hashes`, the chained hashes of `token_ids`' first full blocks, to all its full blocks (in place;
    returned). The prefix cache's keys; the router and the draft model's cache tracking use the same chain.
    (hash_block's chain, with the new blocks' tokens packed at once: half the time of a prompt's hashing.)"""
    start, end = len(hashes), len(token_ids) // block_size
    if start >= end:
        return hashes
    data = _pack_tokens(token_ids[start * block_size:end * block_size])
    parent, width = (hashes[-1] if hashes else 0), 4 * block_size
    for offset in range(0, len(data), width):
        parent = _key(parent, data[offset:offset + width])
        hashes.append(parent)
    return hashes


@dataclass(slots=True, eq=False)
class RequestKV:
    """What the manager holds for one request, on one object: a step reads it with one lookup by request id
    (at cluster scale a lookup in each of several dicts is a cache miss each)."""
    table: list[Block] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)   # chained hashes of its full blocks (kept while it lives)
    num_cached: int = 0       # leading blocks of the table registered in the prefix cache
    num_sent: int = -1        # blocks of the table the runner knows; -1: none, the whole table goes next
    # it got or gave blocks by `fork` (until released): only such a table can hold a shared block where its
    # next tokens go (prefix hits are full blocks before it), so only its writes are checked for CoW
    forked: bool = False


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 num_swap_blocks: int = 0, disk: KVTier | None = None):
        self.pool = BlockPool(num_blocks)
        self.swap = SwapTier(num_swap_blocks) if num_swap_blocks else None
        self.disk = disk                # the disk tier of the prefix cache (kv_store_dir), or None
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.reqs: dict[str, RequestKV] = {}
        self.swapped: dict[str, list[Block]] = {}    # swap-tier blocks of preempted requests
        self.loading: dict[str, list[int]] = {}      # tier keys fetched for requests waiting on them
        self.ops: list[BlockOp] = []
        self.num_queries = self.num_hits = 0         # prefix-cache lookups and hits, in tokens
        self.num_cow_copies = 0
        self.num_disk_hits = 0                       # tokens loaded from the disk tier instead of computed

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def swap_pool(self) -> BlockPool | None:
        return self.swap.pool if self.swap is not None else None

    def _req(self, req_id: str) -> RequestKV:
        st = self.reqs.get(req_id)
        if st is None:
            st = self.reqs[req_id] = RequestKV()
        return st

    def table(self, req_id: str) -> list[Block]:
        st = self.reqs.get(req_id)
        return st.table if st is not None else []

    def block_ids(self, req_id: str) -> list[int]:
        return [b.block_id for b in self.table(req_id)]

    def set_hashes(self, req_id: str, hashes: list[int]) -> None:
        """The request's chain of full-block hashes, computed elsewhere (the same chain: not hashed again)."""
        self._req(req_id).hashes = hashes

    # ---- ops and the runner's view -------------------------------------------------------------------------

    def _op(self, op: BlockOp) -> None:
        """Queue an op, merged into the previous one when it is of the same kind."""
        if self.ops and self.ops[-1].kind == op.kind:
            self.ops[-1].src += op.src
            self.ops[-1].dst += op.dst
        else:
            self.ops.append(op)

    def take_ops(self) -> list[BlockOp]:
        ops, self.ops = self.ops, []
        return ops

    def block_update(self, req_id: str) -> tuple[list[int], bool]:
        """The block ids the runner has not seen: (appended ids, False), or (whole table, True) after the
        table changed other than by appending."""
        st = self.reqs.get(req_id)
        if st is None:                 # (self._req inlined here and in allocate_slots: once per request per step)
            st = self.reqs[req_id] = RequestKV()
        table, sent = st.table, st.num_sent
        if sent == len(table):         # most steps of a decode: nothing new
            return [], False
        st.num_sent = len(table)
        if sent < 0:
            return [b.block_id for b in table], True
        return [b.block_id for b in table[sent:]], False

    # ---- prefix cache ---------------------------------------------------------------------------------------

    def _allocate(self, n: int) -> list[Block]:
        """Blocks from the pool; cached blocks it evicts spill to the disk tier before they are overwritten."""
        blocks = self.pool.allocate(n)
        evicted, self.pool.evicted = self.pool.evicted, []
        if self.disk is not None:
            spill = [(b, h) for b, h in evicted if not self.disk.contains(h)]
            if spill:
                self._op(self.disk.save_op([b for b, _ in spill], [h for _, h in spill]))
        return blocks

    def block_hashes(self, req: Request) -> list[int]:
        """Extend the request's chain of full-block hashes to cover its known tokens."""
        return extend_block_hashes(self._req(req.request_id).hashes, req.all_token_ids, self.block_size)

    def _max_hit_blocks(self, req: Request) -> int:
        """At least one token is always left to compute, so that the step that finishes the prompt yields
        logits. A request that still needs prompt logprobs takes no hits (as in vLLM): a hit skips those
        positions, and with them their logits. Its own blocks are still cached for other requests."""
        if not self.enable_prefix_caching or req.needs_prompt_logprobs:
            return 0
        return (req.num_tokens - 1) // self.block_size

    def cached_prefix(self, hashes: list[int]) -> int:
        """How many leading blocks of this chain of block hashes the prefix cache holds."""
        n = 0
        for h in hashes:
            if self.pool.lookup(h) is None:
                break
            n += 1
        return n

    def get_computed_blocks(self, req: Request) -> list[Block]:
        """Cached blocks that start this request's tokens."""
        hits = []
        for h in self.block_hashes(req)[:self._max_hit_blocks(req)]:
            block = self.pool.lookup(h)
            if block is None:
                break
            hits.append(block)
        return hits

    def tier_hits(self, req: Request, num_computed_blocks: int) -> list[int]:
        """Hashes of the blocks after the memory hits that the disk tier holds, in order (index lookups only)."""
        if self.disk is None:
            return []
        hits = []
        for h in self.block_hashes(req)[num_computed_blocks:self._max_hit_blocks(req)]:
            if not self.disk.contains(h):
                break
            hits.append(h)
        return hits

    def fetch(self, req: Request, keys: list[int]) -> int | None:
        """Ask the disk tier for keys without waiting: None while it reads them, else how many are ready.
        Keys fetched earlier for this request that it no longer needs (its memory hits grew) are dropped."""
        stale = set(self.loading.get(req.request_id, ())) - set(keys)
        if stale:
            self.disk.discard(list(stale))
        self.loading[req.request_id] = keys
        return self.disk.fetch(keys)

    def load_blocks(self, req: Request, first: int, keys: list[int]) -> None:
        """Fill the request's blocks [first, first + len(keys)) from the disk tier; cache them as computed."""
        fetched = self.loading.pop(req.request_id, [])
        if self.disk is not None and len(fetched) > len(keys):
            self.disk.discard(fetched[len(keys):])
        if not keys:
            return
        st = self.reqs[req.request_id]
        blocks = st.table[first:first + len(keys)]
        self._op(self.disk.load_op(keys, [b.block_id for b in blocks]))
        for block, h in zip(blocks, keys):
            self.pool.cache(block, h)
        st.num_cached = first + len(keys)
        self.num_disk_hits += len(keys) * self.block_size

    def adopt_blocks(self, hashes: list[int], limit: int) -> list[tuple[int, int]]:
        """Blocks for KV computed elsewhere (a request that moves here from another replica): each hash not
        cached yet, at most `limit` of them, gets a block registered in the prefix cache, unreferenced (so
        evictable, most recently used). Returns (position in `hashes`, block id) pairs: the caller writes the
        data into those blocks before the next step reads them."""
        if not self.enable_prefix_caching:
            return []
        todo = [i for i, h in enumerate(hashes) if self.pool.lookup(h) is None][:max(0, limit)]
        blocks = self._allocate(len(todo))
        for block, i in zip(blocks, todo):
            self.pool.cache(block, hashes[i])
        self.pool.release(blocks[::-1])
        return [(i, b.block_id) for i, b in zip(todo, blocks)]

    def record_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        """Prefix-cache statistics, counted once per admitted request."""
        self.num_queries += num_tokens
        self.num_hits += num_hit_tokens

    def cache_full_blocks(self, req: Request) -> None:
        """Register the request's newly completed blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        num_full, num_tokens = req.num_computed_tokens, len(req.all_token_ids)    # (req.num_tokens)
        if num_tokens < num_full:      # (min() costs a call, once per request per step)
            num_full = num_tokens
        num_full //= self.block_size
        st = self.reqs.get(req.request_id)
        if st is None or num_full <= st.num_cached:
            return
        hashes = extend_block_hashes(st.hashes, req.all_token_ids, self.block_size)
        table, cache = st.table, self.pool.cache
        for i in range(st.num_cached, num_full):
            cache(table[i], hashes[i])
        st.num_cached = num_full

    # ---- allocation -------------------------------------------------------------------------------------------

    def allocate_slots(self, req: Request, num_new_tokens: int, computed: list[Block] = (),
                       lookahead: int = 0) -> bool:
        """Make room for num_new_tokens more tokens (after `computed` prefix hits), and `lookahead` slots past
        them (where a draft model writes the KV of its drafts: vLLM's num_lookahead_tokens). False when blocks
        are short.

        Copy-on-write: if the block the new tokens start in is shared (a forked sample's prompt tail), the
        request gets its own copy of it first. Only a `forked` table can hold one: the others' shared
        blocks are prefix-cache blocks, which are full and computed, so before the first uncomputed token."""
        st = self.reqs.get(req.request_id)
        if st is None:
            st = self.reqs[req.request_id] = RequestKV()
        table = st.table
        bs, num_computed, num_hits, num_held = self.block_size, req.num_computed_tokens, len(computed), len(table)
        total = num_computed + num_hits * bs + num_new_tokens + lookahead
        num_needed = -(-total // bs) - num_held - num_hits
        if num_hits:
            num_revived = sum(1 for b in computed if b.ref_count == 0)   # cached blocks taken off the free queue
            cow = False
        else:                          # (the per-step case: a running request's next tokens)
            num_revived = 0
            cow = False                # (the per-step case leaves the block unread: a cache miss per request)
            if st.forked:
                i = num_computed // bs
                cow = i < num_held and table[i].ref_count > 1
            if num_needed <= 0 and not cow:
                return True            # its blocks already hold them: nothing to take or copy
        if max(num_needed, 0) + num_revived + cow > self.pool.num_free:
            return False
        if cow:
            old, new = table[i], self._allocate(1)[0]
            self._op(BlockOp("copy", [old.block_id], [new.block_id]))
            self.pool.release([old])
            table[i] = new
            st.num_sent = -1
            self.num_cow_copies += 1
        if computed:
            self.pool.touch(list(computed))
            table.extend(computed)
            st.num_cached += len(computed)
        if num_needed > 0:
            table.extend(self._allocate(num_needed))
        return True

    def fork(self, src: str, dst: Request, num_tokens: int) -> None:
        """Give `dst` the blocks of request `src` that hold its first num_tokens tokens, shared by reference
        (copy-on-write when dst writes into a shared block). n > 1 forks the samples of a prompt from the
        first one; beam search forks a beam."""
        bs = self.block_size
        source = self.reqs[src]
        shared = source.table[:-(-num_tokens // bs)]
        self.pool.touch(shared)
        self.reqs[dst.request_id] = RequestKV(list(shared), source.hashes[:num_tokens // bs],
                                              min(source.num_cached, num_tokens // bs), -1, True)
        source.forked = True
        dst.num_computed_tokens = num_tokens

    def swap_out(self, req: Request) -> bool:
        """Move a preempted request's blocks to the swap tier (False if it has no room). Its computed tokens
        are kept: it resumes where it stopped once swapped back in."""
        table = self.table(req.request_id)
        if self.swap is None or self.swap.num_free < len(table):
            return False
        host = self.swap.allocate(len(table))
        self._op(self.swap.save_op([b.block_id for b in table], [h.block_id for h in host]))
        self._release_table(req.request_id)
        self.swapped[req.request_id] = host
        return True

    def is_swapped(self, req_id: str) -> bool:
        return req_id in self.swapped

    def swap_in(self, req: Request, num_new_tokens: int, background: bool = False) -> bool:
        """Bring a swapped request's blocks back, with room for num_new_tokens more (False if short).
        `background`: the copy runs beside the next step (the request must not compute before the step after)."""
        host = self.swapped[req.request_id]          # (it may hold lookahead blocks past the computed tokens)
        need = max(-(-(req.num_computed_tokens + num_new_tokens) // self.block_size), len(host))
        if need > self.pool.num_free:
            return False
        del self.swapped[req.request_id]
        dev = self._allocate(need)
        op = self.swap.load_op([h.block_id for h in host], [d.block_id for d in dev[:len(host)]])
        if background:
            op.kind = "swap_in_async"
        self._op(op)
        self.swap.release(host)
        st = self._req(req.request_id)
        st.table, st.num_sent = dev, -1
        return True

    def trim(self, req: Request) -> None:
        """Give back the blocks past the request's computed tokens plus one (after rejected proposals)."""
        st = self.reqs.get(req.request_id)
        keep = -(-(req.num_computed_tokens + 1) // self.block_size)
        if st is not None and len(st.table) > keep:
            extra = st.table[keep:]
            del st.table[keep:]
            self.pool.release(extra[::-1])
            st.num_sent = -1

    def _release_table(self, req_id: str) -> None:
        st = self.reqs.get(req_id)
        if st is not None:             # only its hashes stay (prefix hits when it is computed again)
            self.pool.release(st.table[::-1])
            self.reqs[req_id] = RequestKV(hashes=st.hashes)

    def free(self, req: Request) -> None:
        """Give back everything the request holds (its blocks, swap blocks, fetched tier data); its hashes
        stay, so it can take prefix hits when it is computed again."""
        rid = req.request_id
        self._release_table(rid)
        if rid in self.swapped:
            self.swap.release(self.swapped.pop(rid))
        if rid in self.loading and self.disk is not None:
            self.disk.discard(self.loading.pop(rid))

    def forget(self, req: Request) -> None:
        """The request has ended: free it and drop its hashes."""
        self.free(req)
        self.reqs.pop(req.request_id, None)

    def check(self, live: list[str]) -> None:
        """Assert that every block is free, cached, or held by a live request, exactly as often as held."""
        ended = set(self.reqs) - set(live)
        assert not ended, f"state of ended requests: {sorted(ended)}"
        assert set(self.swapped) <= set(live), f"swap tables of ended requests: {sorted(set(self.swapped) - set(live))}"
        refs: dict[int, int] = {}
        for st in self.reqs.values():
            for block in st.table:
                refs[block.block_id] = refs.get(block.block_id, 0) + 1
        self.pool.check(refs)
        if self.swap is not None:
            swap_refs: dict[int, int] = {}
            for table in self.swapped.values():
                for block in table:
                    swap_refs[block.block_id] = swap_refs.get(block.block_id, 0) + 1
            self.swap.pool.check(swap_refs)
