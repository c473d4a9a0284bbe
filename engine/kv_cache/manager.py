"""Which blocks each request holds, and the prefix cache on top of the block pool.

The scheduler is the only caller. A request's blocks cover its tokens in order:

    all_token_ids   | t0 .. t15 | t16 .. t31 | t32 .. t37 _ _ _ ... |
    block_ids       |    b7     |    b2      |        b9            |
                      full, hashed  full, hashed   partial, never hashed

A block is hashed (and so shareable) only once it is full and its KV has been computed.

With a sliding window or attention sinks (`KVWindow`, window.py) blocks that no future query can
read go back to the pool as the request advances; their slots stay in the table as `None`, which
the block table shows as `NULL_BLOCK_ID`:

    block_ids       |  b7  | NULL | NULL |  b4  |  b9  |      (sink, freed, freed, live, live)
"""

from __future__ import annotations

from engine.kv_cache.block_pool import Block, BlockHash, BlockPool, hash_block_tokens
from engine.kv_cache.window import KVWindow
from engine.request import Request

# What a freed slot of the block table reads as. Any real block id does: attention never reads
# a position outside the window (NOTE: so the block may well belong to another request).
NULL_BLOCK_ID = 0


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        window: KVWindow | None = None,
    ):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.window = window or KVWindow(block_size)
        assert self.window.block_size == block_size
        self.pool = BlockPool(num_blocks)
        # A request's blocks by logical index; None where a block left the window.
        self._blocks: dict[str, list[Block | None]] = {}
        # Slots below this index (past the sinks) are already freed or were never needed.
        self._released_upto: dict[str, int] = {}
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
        """The request's block table: one id per logical block, `NULL_BLOCK_ID` where freed."""
        blocks = self._blocks.get(request_id, ())
        return [NULL_BLOCK_ID if b is None else b.block_id for b in blocks]

    def held_block_ids(self, request_id: str) -> list[int]:
        """The blocks the request holds a reference on, in logical order."""
        return [b.block_id for b in self._blocks.get(request_id, ()) if b is not None]

    def live_block_ids(self, request: Request, next_pos: int) -> list[int]:
        """The held blocks that a query at `next_pos` or later may still read: what a transfer
        must carry for the receiver to continue from `next_pos`. Same order on both sides."""
        blocks = self._blocks.get(request.request_id, ())
        return [
            b.block_id
            for i, b in enumerate(blocks)
            if b is not None and self.window.is_live(i, next_pos)
        ]

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
        if cached_prefix:
            held = self._blocks.get(request.request_id)
            assert not held and request.num_computed_tokens == 0, "prefix only at admission"
            start = len(cached_prefix) * self.block_size
        else:
            start = request.num_computed_tokens
            held = self._blocks.get(request.request_id)
            if held and len(held) * self.block_size >= start + num_new_tokens:
                return True  # most decode steps: the last block has room
        return self._allocate(request, start, start + num_new_tokens, cached_prefix or [])

    def allocate_computed(self, request: Request, num_tokens: int) -> bool:
        """Hold the blocks that `num_tokens` tokens computed elsewhere leave live for the next
        query (decode role: a prefill worker fills them). False, changing nothing, if they do
        not fit."""
        assert not self._blocks.get(request.request_id), "only for a request holding nothing"
        return self._allocate(request, num_tokens, num_tokens, [])

    def _allocate(
        self, request: Request, next_pos: int, end_pos: int, cached_prefix: list[Block]
    ) -> bool:
        """Blocks for positions [0, end_pos), queries from `next_pos` on: slots out of the window
        at `next_pos` stay None (and out-of-window cached blocks are not taken)."""
        rid, window = request.request_id, self.window
        prefix = [b if window.is_live(i, next_pos) else None for i, b in enumerate(cached_prefix)]
        held = self._blocks.get(rid) or prefix
        new_slots = range(len(held), self.blocks_needed(end_pos))
        needed = sum(window.is_live(i, next_pos) for i in new_slots)
        touched = [b for b in prefix if b is not None]
        # Cached blocks with no holder sit in the free queue: touching them uses up free slots.
        num_touch_from_free = sum(1 for b in touched if b.ref_cnt == 0)
        if needed > 0 and needed + num_touch_from_free > self.pool.num_free_blocks:
            return False
        if cached_prefix:
            self.pool.touch(touched)
            self._num_hashed_blocks[rid] = len(cached_prefix)
        fresh = iter(self.pool.allocate(needed))
        held = held + [next(fresh) if window.is_live(i, next_pos) else None for i in new_slots]
        self._blocks[rid] = held
        return True

    def release_out_of_window(self, request: Request) -> None:
        """Free the blocks that no query from `num_computed_tokens` on can read. Called by the
        scheduler after each step (after `cache_computed_blocks`, so they stay findable)."""
        if not self.window.frees_blocks:
            return
        rid = request.request_id
        blocks = self._blocks.get(rid)
        if not blocks:
            return
        start = self._released_upto.get(rid, self.window.num_sink_blocks)
        end = min(self.window.first_live_block(request.num_computed_tokens), len(blocks))
        if end <= start:
            return
        dead = [b for b in blocks[start:end] if b is not None]
        blocks[start:end] = [None] * (end - start)
        self.pool.free(list(reversed(dead)))
        self._released_upto[rid] = end

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
            if blocks[i] is None:  # never held here: out of the window when it arrived
                continue
            tokens = tuple(request.all_token_ids[i * bs : (i + 1) * bs])
            self.pool.cache(blocks[i], hashes[i], tokens)
        self._num_hashed_blocks[rid] = num_full

    def free(self, request: Request) -> None:
        """Return all the request's blocks (cached ones stay findable until evicted)."""
        rid = request.request_id
        blocks = self._blocks.pop(rid, [])
        self.pool.free([b for b in reversed(blocks) if b is not None])
        self._num_hashed_blocks.pop(rid, None)
        self._released_upto.pop(rid, None)
        if request.is_finished:
            self._hashes.pop(rid, None)
