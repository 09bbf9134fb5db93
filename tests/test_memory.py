"""Block pool and KV-cache manager on their own: reference counts, LRU eviction, prefix sharing."""
import struct
from hashlib import blake2b

import pytest

from kvflow.memory.block_pool import BlockPool
from kvflow.memory.kv_cache_manager import KVCacheManager, extend_block_hashes, hash_block
from kvflow.request import Request
from kvflow.sampling.params import SamplingParams


def make_request(rid, tokens):
    return Request(rid, list(tokens), SamplingParams(max_tokens=4), stop_ids=set(), max_tokens=4)


def test_allocate_release_and_invariants():
    pool = BlockPool(4)
    blocks = pool.allocate(3)
    assert pool.num_free == 1 and all(b.ref_count == 1 for b in blocks)
    with pytest.raises(RuntimeError):
        pool.allocate(2)
    pool.touch(blocks[:1])
    pool.check({blocks[0].block_id: 2, blocks[1].block_id: 1, blocks[2].block_id: 1})
    pool.release(blocks[::-1])
    pool.release(blocks[:1])
    assert pool.num_free == 4
    pool.check({})
    with pytest.raises(AssertionError):
        pool.release(blocks[:1])


def test_cached_blocks_are_evicted_least_recently_freed_first():
    pool = BlockPool(3)
    a, b, c = pool.allocate(3)
    for block, h in ((a, 1), (b, 2), (c, 3)):
        pool.cache(block, h)
    pool.release([b])
    pool.release([a])
    pool.release([c])            # free order: b, a, c
    assert pool.lookup(2) is b
    (taken,) = pool.allocate(1)
    assert taken is b and pool.lookup(2) is None and pool.num_evictions == 1
    assert pool.lookup(1) is a and pool.lookup(3) is c
    pool.touch([a])              # a cache hit revives a without evicting it
    assert pool.num_free == 1 and pool.lookup(1) is a
    pool.release([a, taken])
    pool.check({})


def test_chained_hash_depends_on_the_whole_prefix():
    h1 = hash_block(None, [1, 2, 3, 4])
    assert h1 == hash_block(None, [1, 2, 3, 4])
    assert hash_block(h1, [5, 6, 7, 8]) != hash_block(hash_block(None, [0, 2, 3, 4]), [5, 6, 7, 8])


def test_block_keys_keep_their_format_and_the_chain_extends_from_any_point():
    """The keys persist (the disk tier's files are named by them): BLAKE2b-64 of the parent's key as a
    little-endian int64, then the token ids as int32s. Extending a chain packs all new blocks at once and
    must give hash_block's chain, from an empty one or from any of its blocks."""
    def key(parent, tokens):
        data = struct.pack(f"<q{len(tokens)}i", parent or 0, *tokens)
        return int.from_bytes(blake2b(data, digest_size=8).digest(), "little", signed=True)

    assert hash_block(None, [1, 2, 3, 4]) == key(None, [1, 2, 3, 4])
    assert hash_block(-5, [7, 49151, 0, 2**31 - 1]) == key(-5, [7, 49151, 0, 2**31 - 1])
    tokens = [(i * 7919) % 49152 for i in range(70)]
    chain = []
    for b in range(70 // 16):
        chain.append(key(chain[-1] if chain else None, tokens[16 * b:16 * b + 16]))
    assert extend_block_hashes([], tokens, 16) == chain
    for k in range(len(chain) + 1):
        assert extend_block_hashes(chain[:k], tokens, 16) == chain
        assert extend_block_hashes(chain[:k], tokens[:16 * k + 15], 16) == chain[:k]


def test_shared_prefix_blocks_are_referenced_twice():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    a = make_request("a", range(10))              # 2 full blocks + 2 tokens
    assert kv.allocate_slots(a, 10, kv.get_computed_blocks(a))
    a.num_computed_tokens = 10
    kv.cache_full_blocks(a)
    b = make_request("b", list(range(8)) + [99, 98, 97])
    hits = kv.get_computed_blocks(b)
    assert [blk.block_id for blk in hits] == kv.block_ids("a")[:2]
    assert kv.allocate_slots(b, 3, hits)
    assert [blk.ref_count for blk in kv.table("a")] == [2, 2, 1]
    kv.check(["a", "b"])
    kv.forget(a)
    kv.forget(b)
    kv.check([])
    assert kv.pool.num_free == 16 and len(kv.pool.cached) == 2


def test_a_request_state_lives_until_it_is_forgotten():
    """Freed (preempted) it keeps its hashes, for prefix hits when it is computed again; forgotten, nothing of
    it is left, and the check names any ended request whose state is (a leak)."""
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a = make_request("a", range(10))
    assert kv.allocate_slots(a, 10)
    a.num_computed_tokens = 10
    kv.cache_full_blocks(a)
    assert kv.block_update("a") == (kv.block_ids("a"), True) and kv.block_update("a") == ([], False)
    kv.free(a)
    assert kv.table("a") == [] and len(kv.reqs["a"].hashes) == 2
    assert [b.block_id for b in kv.get_computed_blocks(a)] == [blk.block_id for blk in kv.pool.cached.values()]
    assert kv.allocate_slots(a, 10)
    assert kv.block_update("a")[1]               # its new table goes whole to the runner
    with pytest.raises(AssertionError, match="ended requests: \\['a'\\]"):
        kv.check([])
    kv.forget(a)
    assert "a" not in kv.reqs
    kv.check([])

def test_allocation_fails_cleanly_when_blocks_run_out():
    kv = KVCacheManager(num_blocks=3, block_size=4)
    a = make_request("a", range(12))
    assert not kv.allocate_slots(a, 13)
    assert kv.table("a") == [] and kv.pool.num_free == 3
    assert kv.allocate_slots(a, 12)
    kv.check(["a"])
    kv.forget(a)
