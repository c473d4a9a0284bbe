"""The pool of KV blocks: reference counts, the free list and the prefix cache's hash table.

A block is in exactly one of three states:

    in use      ref_cnt > 0                      (held by one or more requests)
    cached      ref_cnt == 0, block_hash set     (in the free queue, evictable, reusable on a hit)
    empty       ref_cnt == 0, block_hash None    (in the free queue)

The free queue is ordered least-recently-freed first, so allocation evicts the coldest cached
block. `num_free_blocks` counts cached and empty blocks alike: both can be handed out.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from dataclasses import dataclass, field

BlockHash = bytes


def hash_block_tokens(
    parent_hash: BlockHash | None, token_ids: tuple[int, ...], extra_keys: tuple = ()
) -> BlockHash:
    """Chained hash of one full block: (parent hash, the block's tokens, extra keys).

    sha256 rather than Python's `hash` so that every process (prefill workers, decode workers,
    the router) computes the same value for the same prefix.
    """
    h = hashlib.sha256(parent_hash or b"\0")
    h.update(struct.pack(f"<{len(token_ids)}I", *token_ids))
    if extra_keys:
        h.update(repr(extra_keys).encode())
    return h.digest()[:16]


@dataclass
class Block:
    block_id: int
    ref_cnt: int = 0
    block_hash: BlockHash | None = None
    # The tokens the hash was computed over, kept to confirm a hit (hash collisions are possible).
    token_ids: tuple[int, ...] | None = None


@dataclass
class PrefixCacheStats:
    queried_tokens: int = 0
    hit_tokens: int = 0
    evicted_blocks: int = 0
    queries: int = 0
    hits: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


@dataclass
class BlockPool:
    num_blocks: int
    blocks: list[Block] = field(init=False)
    stats: PrefixCacheStats = field(default_factory=PrefixCacheStats)

    def __post_init__(self) -> None:
        self.blocks = [Block(i) for i in range(self.num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(self.num_blocks))
        self._cached: dict[BlockHash, int] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def allocate(self, count: int) -> list[Block]:
        """Take `count` blocks off the free queue (coldest first), evicting cached contents.
        The caller must have checked `num_free_blocks >= count`."""
        assert count <= len(self._free), "allocate() beyond the free count"
        taken = []
        for _ in range(count):
            block_id, _ = self._free.popitem(last=False)
            block = self.blocks[block_id]
            if block.block_hash is not None:
                self._evict(block)
            block.ref_cnt = 1
            taken.append(block)
        return taken

    def touch(self, blocks: list[Block]) -> None:
        """Take a reference on blocks found in the prefix cache (they may sit in the free queue)."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1

    def free(self, blocks: list[Block]) -> None:
        """Drop one reference from each block. NOTE: pass a request's blocks tail first, so that
        its last blocks (least likely to be shared) are evicted before its first ones."""
        for block in blocks:
            assert block.ref_cnt > 0, f"double free of block {block.block_id}"
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block.block_id] = None

    def lookup(self, block_hash: BlockHash, token_ids: tuple[int, ...]) -> Block | None:
        """The cached block holding exactly these tokens under this chained hash, or None.
        Does not change any state."""
        block_id = self._cached.get(block_hash)
        if block_id is None:
            return None
        block = self.blocks[block_id]
        return block if block.token_ids == token_ids else None

    def cache(self, block: Block, block_hash: BlockHash, token_ids: tuple[int, ...]) -> None:
        """Register a full, computed block under its hash. If another block already holds the same
        content (two requests computed it concurrently), this one stays uncached."""
        if block.block_hash is not None or block_hash in self._cached:
            return
        block.block_hash = block_hash
        block.token_ids = token_ids
        self._cached[block_hash] = block.block_id

    def _evict(self, block: Block) -> None:
        del self._cached[block.block_hash]
        block.block_hash = None
        block.token_ids = None
        self.stats.evicted_blocks += 1

    def reset_prefix_cache(self) -> None:
        """Forget every cached block that no request holds (e.g. after new weights load)."""
        for block in self.blocks:
            if block.ref_cnt == 0 and block.block_hash is not None:
                self._evict(block)
