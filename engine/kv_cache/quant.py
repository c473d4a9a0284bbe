"""8-bit KV cache: FP8 (e4m3) or INT8 values with a float32 scale per token and KV head.

Each token's K (or V) of one head is one row of the cache, its scale in the row's last 4 bytes:

    row (head_dim + 4 bytes) | q_0 q_1 ... q_{D-1} | scale (float32, 4 bytes) |
    value_i = q_i * scale,     scale = max_i |x_i| / QMAX   (QMAX: 127 int8, 448 e4m3)

so a layer's cache stays one contiguous [2, num_blocks, block_size, kv_heads, head_dim + 4]
tensor of bytes: a block carries its own scales, and whatever moves blocks (the prefix cache,
kvtransfer's row copies) moves the scales with them, unchanged.

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
    """Elements of the cache's last dim: head_dim, plus the scale's bytes when quantized."""
    return head_dim + SCALE_BYTES if is_quantized(kv_cache_dtype) else head_dim


def quantize(x: torch.Tensor, kv_cache_dtype: str) -> torch.Tensor:
    """[..., head_dim] float -> [..., head_dim + 4] rows in the cache's storage dtype."""
    x = x.float()
    scale = x.abs().amax(dim=-1, keepdim=True) / _QMAX[kv_cache_dtype]
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # an all-zero row stays 0
    if kv_cache_dtype == "int8":
        q = (x / scale).round_().clamp_(-127, 127).to(torch.int8)
    else:
        q = (x / scale).to(torch.float8_e4m3fn).view(torch.uint8)
    return torch.cat([q, scale.view(q.dtype)], dim=-1)


def dequantize(rows: torch.Tensor, kv_cache_dtype: str, dtype: torch.dtype) -> torch.Tensor:
    """[..., head_dim + 4] cache rows -> [..., head_dim] values in `dtype`."""
    q, scale_bytes = rows[..., :-SCALE_BYTES], rows[..., -SCALE_BYTES:]
    scale = scale_bytes.contiguous().view(torch.float32)
    if kv_cache_dtype == "fp8":
        q = q.view(torch.float8_e4m3fn)
    return (q.float() * scale).to(dtype)
