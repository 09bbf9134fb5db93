"""Per-request KV block tables on top of the block pool, with automatic prefix caching.

A full block is identified by a chained hash of its tokens (hash of the parent block's hash and its
own token ids), so equal hashes mean equal whole prefixes. Full blocks are registered in the pool's
cache as soon as they are computed; a new request reuses the longest run of cached blocks that
starts its prompt, and only computes the rest.
"""
import hashlib
import struct

from kvflow.memory.block_pool import Block, BlockPool
from kvflow.request import Request


def hash_block(parent_hash: int | None, token_ids: list[int]) -> int:
    data = struct.pack(f"<q{len(token_ids)}i", parent_hash or 0, *token_ids)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 num_swap_blocks: int = 0):
        self.pool = BlockPool(num_blocks)
        self.swap_pool = BlockPool(num_swap_blocks) if num_swap_blocks else None   # the second tier
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.num_queries = self.num_hits = 0    # prefix-cache lookups and hits, in tokens
        self.num_cow_copies = 0
        # block moves the model runner must apply, in this order, before the next forward pass:
        # ("copy", src, dst) device -> device (copy-on-write), ("out", device, swap), ("in", swap, device),
        # ("spill", device, hash) to the disk tier, ("load", device, tensors) from it
        self.ops: list[tuple] = []
        self.disk = None                # DiskKVStore: the disk tier of the prefix cache (kv_store_dir)
        self.num_disk_hits = 0          # tokens loaded from the disk tier instead of computed

    def _allocate(self, n: int) -> list[Block]:
        """Blocks from the pool; cached blocks it evicts spill to the disk tier before they are overwritten."""
        blocks = self.pool.allocate(n)
        evicted, self.pool.evicted = self.pool.evicted, []
        if self.disk is not None:
            self.ops += [("spill", b, h) for b, h in evicted if h not in self.disk]
        return blocks

    def disk_hits(self, req: Request, num_computed_blocks: int) -> list[tuple[int, list]]:
        """(hash, tensors) of the blocks after the memory hits that the disk tier holds, in order."""
        if self.disk is None or not self.enable_prefix_caching or req.needs_prompt_logprobs:
            return []
        max_blocks = (len(req.all_token_ids) - 1) // self.block_size
        hits = []
        for h in self.block_hashes(req)[num_computed_blocks:max_blocks]:
            tensors = self.disk.load(h) if h in self.disk else None
            if tensors is None:
                break
            hits.append((h, tensors))
        return hits

    def load_blocks(self, req: Request, first: int, hits: list[tuple[int, list]]) -> None:
        """Fill req's blocks [first, first + len(hits)) from the disk tier and cache them as computed."""
        if not hits:
            return
        for i, (h, tensors) in enumerate(hits):
            block = req.block_table[first + i]
            self.ops.append(("load", block.block_id, tensors))
            self.pool.cache(block, h)
        req.num_cached_blocks = first + len(hits)
        self.num_disk_hits += len(hits) * self.block_size

    def take_ops(self) -> list[tuple[str, int, int]]:
        ops, self.ops = self.ops, []
        return ops

    @property
    def num_blocks(self) -> int:
        return len(self.pool.blocks)

    def block_hashes(self, req: Request) -> list[int]:
        """Extend the request's chain of full-block hashes to cover its known tokens."""
        bs, hashes, tokens = self.block_size, req.block_hashes, req.all_token_ids
        for i in range(len(hashes), len(tokens) // bs):
            hashes.append(hash_block(hashes[-1] if hashes else None, tokens[i * bs:(i + 1) * bs]))
        return hashes

    def get_computed_blocks(self, req: Request) -> list[Block]:
        """Cached blocks that start this request's tokens. At least one token is always left to compute,
        so that the step that finishes the prompt produces logits.

        A request that still needs prompt logprobs takes no hits (as in vLLM): a hit skips computing those
        positions, and with them their logits. Its own blocks are still cached for other requests."""
        if not self.enable_prefix_caching or req.needs_prompt_logprobs:
            return []
        max_blocks = (len(req.all_token_ids) - 1) // self.block_size
        hits = []
        for h in self.block_hashes(req)[:max_blocks]:
            block = self.pool.lookup(h)
            if block is None:
                break
            hits.append(block)
        return hits

    def record_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        """Prefix-cache statistics, counted once per admitted request."""
        self.num_queries += num_tokens
        self.num_hits += num_hit_tokens

    def allocate_slots(self, req: Request, num_new_tokens: int, computed: list[Block] = ()) -> bool:
        """Make room for num_new_tokens more tokens (after `computed` prefix hits). False when blocks are short.

        Copy-on-write: if the block the new tokens start in is shared (a forked sample's prompt tail), the
        request gets its own copy of it first."""
        total = req.num_computed_tokens + len(computed) * self.block_size + num_new_tokens
        num_needed = -(-total // self.block_size) - len(req.block_table) - len(computed)
        num_revived = sum(1 for b in computed if b.ref_count == 0)   # cached blocks taken off the free queue
        i = req.num_computed_tokens // self.block_size
        cow = not computed and i < len(req.block_table) and req.block_table[i].ref_count > 1
        if max(num_needed, 0) + num_revived + cow > self.pool.num_free:
            return False
        if cow:
            old, new = req.block_table[i], self._allocate(1)[0]
            self.ops.append(("copy", old.block_id, new.block_id))
            self.pool.release([old])
            req.block_table[i] = new
            self.num_cow_copies += 1
        self.pool.touch(list(computed))
        req.block_table.extend(computed)
        req.num_cached_blocks += len(computed)
        if num_needed > 0:
            req.block_table.extend(self._allocate(num_needed))
        return True

    def fork(self, req: Request, src: Request) -> None:
        """Give `req` (another sample of src's prompt) src's blocks for all of the prompt but its last token,
        shared by reference: only the last token is computed again (it yields the logits that req samples
        from), and the block it is written into is copied on that write."""
        bs, n = self.block_size, len(req.prompt_token_ids) - 1
        shared = src.block_table[:-(-n // bs)]
        self.pool.touch(shared)
        req.block_table = list(shared)
        req.block_hashes = src.block_hashes[:n // bs]
        req.num_cached_blocks = min(src.num_cached_blocks, n // bs)
        req.num_computed_tokens = n

    def swap_out(self, req: Request) -> bool:
        """Move a preempted request's blocks to the swap tier (False if it has no room). Its computed tokens
        are kept: it resumes where it stopped once swapped back in."""
        if self.swap_pool is None or self.swap_pool.num_free < len(req.block_table):
            return False
        host = self.swap_pool.allocate(len(req.block_table))
        self.ops += [("out", d.block_id, h.block_id) for d, h in zip(req.block_table, host)]
        self.free(req)
        req.swapped_table = host
        return True

    def swap_in(self, req: Request, num_new_tokens: int) -> bool:
        """Bring a swapped request's blocks back, with room for num_new_tokens more (False if short)."""
        need = -(-(req.num_computed_tokens + num_new_tokens) // self.block_size)
        if need > self.pool.num_free:
            return False
        dev = self._allocate(need)
        self.ops += [("in", h.block_id, d.block_id) for h, d in zip(req.swapped_table, dev)]
        self.swap_pool.release(req.swapped_table[::-1])
        req.swapped_table = []
        req.block_table = dev
        return True

    def cache_full_blocks(self, req: Request) -> None:
        """Register the request's newly completed blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        num_full = req.num_computed_tokens // self.block_size
        if num_full <= req.num_cached_blocks:
            return
        hashes = self.block_hashes(req)
        for i in range(req.num_cached_blocks, num_full):
            self.pool.cache(req.block_table[i], hashes[i])
        req.num_cached_blocks = num_full

    def free(self, req: Request) -> None:
        self.pool.release(req.block_table[::-1])
        req.block_table = []
        req.num_cached_blocks = 0
        if req.swapped_table:
            self.swap_pool.release(req.swapped_table[::-1])
            req.swapped_table = []

    def check(self, live: list[Request]) -> None:
        refs: dict[int, int] = {}
        swap_refs: dict[int, int] = {}
        for req in live:
            for block in req.block_table:
                refs[block.block_id] = refs.get(block.block_id, 0) + 1
            for block in req.swapped_table:
                swap_refs[block.block_id] = swap_refs.get(block.block_id, 0) + 1
        self.pool.check(refs)
        if self.swap_pool is not None:
            self.swap_pool.check(swap_refs)
