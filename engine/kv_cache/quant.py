"""8-bit KV cache: FP8 (e4m3) or INT8 values with a float32 scale per token and KV head.

A layer's cache stays one contiguous [2, num_blocks, block_size, kv_heads, head_dim + 4] tensor
of bytes, so kvtransfer, the prefix cache and the block accounting see the same shape as ever;
only the bytes of each block are laid out as values first, then that block's scales:

    block (block_size * kv_heads * (head_dim + 4) bytes)
    | values [block_size, kv_heads, head_dim] (1 byte each) | scales [block_size, kv_heads] f32 |
    value = q * scale,   scale = max |x| / QMAX over the token's head   (QMAX: 127 int8, 448 e4m3)

A block carries its own scales: whatever moves blocks (kvtransfer's row copies, the prefix
cache) moves the scales with them, unchanged. Values first keeps every value row aligned to
head_dim bytes (16-byte vector loads in the kernels), which rows of head_dim + 4 would not be.

Why per token and head, not static per-layer scales from a first prefill: a decode worker never
runs a prefill, so static scales would have to be shipped and agreed between workers, and a later
prompt with larger outliers than the first would clip. Per-token scales cost 4 bytes per
head_dim values (3% at head_dim 128) and need no calibration.

The storage dtype is int8 for "int8" and uint8 (the e4m3 bits) for "fp8": plain byte types every
transport (gloo, NCCL) carries, and different ones, so a pair of workers whose caches disagree
fails kvtransfer's layout handshake instead of reading each other's bytes wrongly.
"""

from __future__ import annotations

import torch

SCALE_BYTES = 4
_STORAGE = {"int8": torch.int8, "fp8": torch.uint8}
_QMAX = {"int8": 127.0, "fp8": 448.0}


def is_quantized(kv_cache_dtype: str) -> bool:
    return kv_cache_dtype != "auto"


def cache_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    return _STORAGE.get(kv_cache_dtype, model_dtype)


def cache_row_size(kv_cache_dtype: str, head_dim: int) -> int:
    """The cache's last dim: head_dim, plus the scale's bytes when quantized (the block's bytes
    are then laid out as above, not as rows of this size)."""
    if not is_quantized(kv_cache_dtype):
        return head_dim
    if head_dim % SCALE_BYTES:
        raise ValueError(f"8-bit KV cache needs head_dim % 4 == 0, got {head_dim}")
    return head_dim + SCALE_BYTES


def split_blocks(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, block_size, heads, head_dim + 4] blocks -> views (values [n, block_size, heads,
    head_dim] in the storage dtype, scales [n, block_size, heads] float32) of the same bytes."""
    n, block_size, heads, row = blocks.shape
    flat = blocks.reshape(n, -1)  # a view: blocks is contiguous per block
    num_values = block_size * heads * (row - SCALE_BYTES)
    values = flat[:, :num_values].view(n, block_size, heads, row - SCALE_BYTES)
    scales = flat[:, num_values:].view(torch.float32).view(n, block_size, heads)
    return values, scales


def quantize(x: torch.Tensor, kv_cache_dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., head_dim] float -> (values [..., head_dim] in the storage dtype, scales [...])."""
    x = x.float()
    scale = x.abs().amax(dim=-1, keepdim=True) / _QMAX[kv_cache_dtype]
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # an all-zero row stays 0
    if kv_cache_dtype == "int8":
        q = (x / scale).round_().clamp_(-127, 127).to(torch.int8)
    else:
        q = (x / scale).to(torch.float8_e4m3fn).view(torch.uint8)
    return q, scale.squeeze(-1)


def dequantize(values: torch.Tensor, scales: torch.Tensor, kv_cache_dtype: str, dtype):
    """(values [..., head_dim], scales [...]) -> [..., head_dim] in `dtype`."""
    if kv_cache_dtype == "fp8":
        values = values.view(torch.float8_e4m3fn)
    return (values.float() * scales.unsqueeze(-1)).to(dtype)


def write(cache: torch.Tensor, slot_mapping: torch.Tensor, x: torch.Tensor, kind: str) -> None:
    """Quantize x [num_tokens, heads, head_dim] into K's or V's half of a layer's cache
    ([num_blocks, block_size, heads, head_dim + 4]) at `slot_mapping`."""
    values, scales = split_blocks(cache)
    q, scale = quantize(x, kind)
    block_size = cache.shape[1]
    block, offset = slot_mapping // block_size, slot_mapping % block_size
    values[block, offset] = q
    scales[block, offset] = scale


def read(blocks: torch.Tensor, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """Gathered blocks [n, block_size, heads, head_dim + 4] -> [n, block_size, heads, head_dim]
    dequantized to `dtype`."""
    values, scales = split_blocks(blocks)
    return dequantize(values, scales, kind, dtype)
