"""Which blocks each request holds, and the prefix cache on top of the block pool.

The scheduler is the only caller. A request's blocks cover its tokens in order:

    all_token_ids   | t0 .. t15 | t16 .. t31 | t32 .. t37 _ _ _ ... |
    block_ids       |    b7     |    b2      |        b9            |
                      full, hashed  full, hashed   partial, never hashed

A block is hashed (and so shareable) only once it is full and its KV has been computed.
"""

from __future__ import annotations

from engine.kv_cache.block_pool import Block, BlockHash, BlockPool, hash_block_tokens
from engine.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        self._blocks: dict[str, list[Block]] = {}
        self._hashes: dict[str, list[BlockHash]] = {}
        # How many of a request's leading blocks are registered in the prefix cache already.
        self._num_hashed_blocks: dict[str, int] = {}

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def stats(self):
        return self.pool.stats

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self._blocks.get(request_id, ())]

    def blocks_needed(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    def _block_hashes(self, request: Request) -> list[BlockHash]:
        """Chained hashes of the request's full blocks, extended as tokens arrive."""
        hashes = self._hashes.setdefault(request.request_id, [])
        bs = self.block_size
        tokens = request.all_token_ids
        for i in range(len(hashes), len(tokens) // bs):
            parent = hashes[-1] if hashes else None
            block_tokens = tuple(tokens[i * bs : (i + 1) * bs])
            hashes.append(hash_block_tokens(parent, block_tokens, request.cache_extra_keys))
        return hashes

    def find_cached_prefix(self, request: Request) -> list[Block]:
        """The longest run of the request's leading blocks already in the cache.

        Changes nothing: the blocks are only safe to use once `allocate` has taken them. The last
        token is never served from cache, because its logits are needed to sample.
        """
        if not self.enable_prefix_caching:
            return []
        hashes = self._block_hashes(request)
        max_blocks = (request.num_tokens - 1) // self.block_size
        bs = self.block_size
        hits: list[Block] = []
        for i in range(min(max_blocks, len(hashes))):
            tokens = tuple(request.all_token_ids[i * bs : (i + 1) * bs])
            block = self.pool.lookup(hashes[i], tokens)
            if block is None:
                break
            hits.append(block)
        stats = self.pool.stats
        stats.queries += 1
        stats.queried_tokens += request.num_tokens
        stats.hit_tokens += len(hits) * bs
        stats.hits += bool(hits)
        return hits

    def allocate(
        self, request: Request, num_new_tokens: int, cached_prefix: list[Block] | None = None
    ) -> bool:
        """Make the request hold blocks for its computed tokens plus `num_new_tokens`.

        `cached_prefix` (from `find_cached_prefix`, at admission) is taken first. Returns False,
        changing nothing, if the free blocks do not suffice.
        """
        held = self._blocks.get(request.request_id, [])
        cached_prefix = cached_prefix or []
        if cached_prefix:
            assert not held and request.num_computed_tokens == 0, "prefix only at admission"
            num_tokens = len(cached_prefix) * self.block_size + num_new_tokens
        else:
            num_tokens = request.num_computed_tokens + num_new_tokens
        needed = self.blocks_needed(num_tokens) - len(held) - len(cached_prefix)
        # Cached blocks with no holder sit in the free queue: touching them uses up free slots.
        num_touch_from_free = sum(1 for b in cached_prefix if b.ref_cnt == 0)
        if needed > 0 and needed + num_touch_from_free > self.pool.num_free_blocks:
            return False
        if cached_prefix:
            self.pool.touch(cached_prefix)
            held = list(cached_prefix)
            self._num_hashed_blocks[request.request_id] = len(cached_prefix)
        if needed > 0:
            held = held + self.pool.allocate(needed)
        self._blocks[request.request_id] = held
        return True

    def cache_computed_blocks(self, request: Request) -> None:
        """Register the request's newly full, computed blocks in the prefix cache.
        Call after the step whose KV writes advanced `num_computed_tokens`."""
        if not self.enable_prefix_caching:
            return
        rid = request.request_id
        num_full = request.num_computed_tokens // self.block_size
        start = self._num_hashed_blocks.get(rid, 0)
        if num_full <= start:
            return
        hashes = self._block_hashes(request)
        blocks = self._blocks[rid]
        bs = self.block_size
        for i in range(start, num_full):
            tokens = tuple(request.all_token_ids[i * bs : (i + 1) * bs])
            self.pool.cache(blocks[i], hashes[i], tokens)
        self._num_hashed_blocks[rid] = num_full

    def free(self, request: Request) -> None:
        """Return all the request's blocks (cached ones stay findable until evicted)."""
        rid = request.request_id
        blocks = self._blocks.pop(rid, [])
        self.pool.free(list(reversed(blocks)))
        self._num_hashed_blocks.pop(rid, None)
        if request.is_finished:
            self._hashes.pop(rid, None)
