from engine.kv_cache.block_pool import Block, BlockPool, PrefixCacheStats, hash_block_tokens
from engine.kv_cache.manager import NULL_BLOCK_ID, KVCacheManager
from engine.kv_cache.window import KVWindow

__all__ = [
    "NULL_BLOCK_ID",
    "Block",
    "BlockPool",
    "KVCacheManager",
    "KVWindow",
    "PrefixCacheStats",
    "hash_block_tokens",
]
