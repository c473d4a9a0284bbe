from engine.kv_cache.block_pool import Block, BlockPool, PrefixCacheStats, hash_block_tokens
from engine.kv_cache.manager import KVCacheManager

__all__ = ["Block", "BlockPool", "KVCacheManager", "PrefixCacheStats", "hash_block_tokens"]
