"""Block pool and prefix cache: reference counts, LRU eviction, confirmed hits."""

from __future__ import annotations

from engine.kv_cache import BlockPool, KVCacheManager, hash_block_tokens
from engine.request import Request
from engine.sampling_params import SamplingParams


def make_request(rid, tokens):
    return Request(rid, list(tokens), SamplingParams(max_tokens=4))


def test_hash_is_chained_and_keyed():
    a = hash_block_tokens(None, (1, 2, 3))
    assert a == hash_block_tokens(None, (1, 2, 3))
    assert a != hash_block_tokens(None, (1, 2, 4))
    assert hash_block_tokens(a, (5,)) != hash_block_tokens(None, (5,))
    assert hash_block_tokens(None, (1,), ("adapter-a",)) != hash_block_tokens(None, (1,))


def test_free_returns_blocks_and_lru_evicts_coldest():
    pool = BlockPool(4)
    blocks = pool.allocate(3)
    assert pool.num_free_blocks == 1
    for i, b in enumerate(blocks):
        pool.cache(b, bytes([i]) * 16, (i,))
    pool.free([blocks[2], blocks[1], blocks[0]])  # tail first, as a request frees
    assert pool.num_free_blocks == 4 and pool.num_cached_blocks == 3
    # The never-used block goes first, then the cached ones in the order they were freed.
    order = [pool.allocate(1)[0].block_id for _ in range(2)]
    assert order == [3, blocks[2].block_id]
    assert pool.num_cached_blocks == 2 and pool.stats.evicted_blocks == 1


def test_lookup_confirms_tokens_on_hash_collision():
    pool = BlockPool(2)
    (block,) = pool.allocate(1)
    pool.cache(block, b"h" * 16, (1, 2))
    assert pool.lookup(b"h" * 16, (1, 2)) is block
    assert pool.lookup(b"h" * 16, (9, 9)) is None  # same hash, other tokens: not a hit


def test_shared_prefix_blocks_are_refcounted():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    a = make_request("a", range(10))  # 2 full blocks + 2 tokens
    assert kv.allocate(a, 10)
    a.num_computed_tokens = 10
    kv.cache_computed_blocks(a)
    b = make_request("b", list(range(8)) + [50, 51, 52])
    hit = kv.find_cached_prefix(b)
    assert [blk.block_id for blk in hit] == kv.block_ids("a")[:2]
    assert kv.allocate(b, 3, hit)
    assert all(blk.ref_cnt == 2 for blk in hit)
    a.status = b.status = a.status.FINISHED_ABORTED
    kv.free(a)
    kv.free(b)
    assert kv.num_free_blocks == 10


def test_last_token_never_served_from_cache():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    a = make_request("a", range(8))
    assert kv.allocate(a, 8)
    a.num_computed_tokens = 8
    kv.cache_computed_blocks(a)
    same = make_request("b", range(8))
    assert len(kv.find_cached_prefix(same)) == 1  # 7 tokens may come from cache: one block


def test_allocate_fails_without_side_effects():
    kv = KVCacheManager(num_blocks=3, block_size=4)
    a = make_request("a", range(20))
    assert not kv.allocate(a, 20)
    assert kv.num_free_blocks == 3 and kv.block_ids("a") == []
