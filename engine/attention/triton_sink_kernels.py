"""The decode kernel for attention sinks (StreamingLLM): paged attention over unrotated keys,
each rotated in the kernel by its position in the cache.

A decode at text position p (context length n = p + 1) sees the first S tokens and the last W
(sink_backend.py explains why positions count within that cache). Its keys, in cache order, are
numbered by one index c, which is at once the split-K coordinate and the RoPE position:

    text positions j    0 1 2 3 | 4 .. 10 (gone) | 11 12 .. 17     S = 4, W = 7, n = 18
    cache positions c   0 1 2 3 |                | 4  5  .. 10    c = j for sinks, j - shift else
                                                                  shift = max(n - W - S, 0)

The query sits last, at c = num_keys - 1. Keys and query are rotated with the same cos/sin table
(`rope`: row c holds cos(c * inv_freq), then sin, as the model's table computes them), in
float32, then multiplied in the model dtype as the plain decode kernel does.

Block tables are compact (`compact_columns`): a row holds the sink blocks, then the window's
blocks from the first one a query can still read, so its width stays bounded however long the
text grows (the CUDA graphs' static tables need that) and a freed block is never addressed.

    column              0 .. NSB-1       | NSB, NSB+1, ...
    holds text block    0 .. NSB-1       | first, first + 1, ...    first = max((n - W) // B, NSB)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.attention.triton_kernels import (
    DECODE_BLOCK_N,
    _cache_strides,
    _decode_store,
    _flash_step,
    _load_kv,
    _precision,
    decode_partials,
    reduce_splits,
)


def compact_columns(seq_len: int, num_sinks: int, window: int, block_size: int) -> tuple[int, int]:
    """(number of sink blocks, first window block): a compact row is the logical row's columns
    [0, num_sink_blocks) followed by [first, ...). The kernel computes the same on the device."""
    num_sink_blocks = -(-num_sinks // block_size)
    return num_sink_blocks, max(max(seq_len - window, 0) // block_size, num_sink_blocks)


def max_compact_width(num_sinks: int, window: int, block_size: int) -> int:
    """The widest compact row: the sink blocks and the blocks W keys can straddle."""
    return -(-num_sinks // block_size) + -(-(window - 1) // block_size) + 1


@triton.jit
def _rotate(x1, x2, cos, sin, dtype):
    """RoPE (rotate-half convention) on the two halves of the head dimension, in float32."""
    x1, x2 = x1.to(tl.float32), x2.to(tl.float32)
    return (x1 * cos - x2 * sin).to(dtype), (x2 * cos + x1 * sin).to(dtype)


@triton.jit
def _sink_decode_kernel(
    query,
    k_cache,
    v_cache,
    block_tables,  # compact: see the module docstring
    seq_lens,
    token_idx,
    out,
    part_acc,  # [num_seqs, num_heads, num_splits, BLOCK_D] float32
    part_ml,  # [num_seqs, num_heads, num_splits, 2] float32: running max, running sum
    rope,  # [2, S + W, HALF]: cos, sin at cache positions
    scale,
    num_splits,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_bt,
    SINKS: tl.constexpr,
    WINDOW: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_TOKEN_IDX: tl.constexpr,
    SPLIT: tl.constexpr,
    PRECISION: tl.constexpr,
    QUANT: tl.constexpr,
    SCALES_AT: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens + seq)
    row = tl.load(token_idx + seq).to(tl.int64) if HAS_TOKEN_IDX else seq.to(tl.int64)
    recent_start = tl.maximum(seq_len - WINDOW, SINKS)  # text position of the first recent key
    shift = recent_start - SINKS
    num_keys = tl.minimum(seq_len, SINKS) + tl.maximum(seq_len - recent_start, 0)
    NUM_SINK_BLOCKS: tl.constexpr = (SINKS + PAGE - 1) // PAGE
    first_block = tl.maximum(tl.maximum(seq_len - WINDOW, 0) // PAGE, NUM_SINK_BLOCKS)
    # Each split takes a whole number of tiles of cache positions.
    per_split = tl.cdiv(tl.cdiv(num_keys, num_splits), BLOCK_N) * BLOCK_N
    lo = split * per_split
    hi = tl.minimum(lo + per_split, num_keys)

    g = tl.arange(0, BLOCK_G)
    h = tl.arange(0, BLOCK_H)  # a column of each half of the head dimension
    d = tl.arange(0, BLOCK_D)
    g_mask = g < GROUP
    h_mask = h < HALF
    heads = kv_head * GROUP + g
    q_offs = query + row * stride_qt + heads[:, None] * stride_qh + h[None, :]
    q_mask = g_mask[:, None] & h_mask[None, :]
    q1 = tl.load(q_offs, mask=q_mask, other=0.0)
    q2 = tl.load(q_offs + HALF, mask=q_mask, other=0.0)
    q_rope = rope + (num_keys - 1) * HALF + h  # the query is the last key
    q_cos = tl.load(q_rope, mask=h_mask, other=0.0).to(tl.float32)
    q_sin = tl.load(q_rope + (SINKS + WINDOW) * HALF, mask=h_mask, other=0.0).to(tl.float32)
    q1, q2 = _rotate(q1, q2, q_cos[None, :], q_sin[None, :], q1.dtype)

    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    table = block_tables + seq.to(tl.int64) * stride_bt
    for tile in range(lo, hi, BLOCK_N):
        c = tile + tl.arange(0, BLOCK_N)  # cache positions
        valid = c < hi
        pos = tl.where(c < SINKS, c, c + shift)  # text positions
        col = tl.where(
            pos < NUM_SINK_BLOCKS * PAGE, pos // PAGE, NUM_SINK_BLOCKS + pos // PAGE - first_block
        )
        page = tl.load(table + col, mask=valid, other=0).to(tl.int64)
        page_offs = page * stride_kb
        row_offs = (pos % PAGE) * stride_ks + kv_head * stride_kh
        half_mask = valid[:, None] & h_mask[None, :]
        k1 = _load_kv(
            k_cache, page_offs, row_offs, h, valid, half_mask, HEAD_DIM, SCALES_AT, QUANT, q1.dtype
        )
        k2 = _load_kv(
            k_cache, page_offs, row_offs, h + HALF, valid, half_mask, HEAD_DIM, SCALES_AT, QUANT,
            q1.dtype,
        )  # fmt: skip
        k_rope = rope + c[:, None] * HALF + h[None, :]
        cos = tl.load(k_rope, mask=half_mask, other=0.0).to(tl.float32)
        sin = tl.load(k_rope + (SINKS + WINDOW) * HALF, mask=half_mask, other=0.0).to(tl.float32)
        k1, k2 = _rotate(k1, k2, cos, sin, q1.dtype)
        s = tl.dot(q1, tl.trans(k1), input_precision=PRECISION)
        s += tl.dot(q2, tl.trans(k2), input_precision=PRECISION)
        s = tl.where(valid[None, :], s * scale, float("-inf"))
        v = _load_kv(
            v_cache, page_offs, row_offs, d, valid, valid[:, None] & (d < HEAD_DIM)[None, :],
            HEAD_DIM, SCALES_AT, QUANT, q1.dtype,
        )  # fmt: skip
        m, l_sum, acc = _flash_step(s, v, m, l_sum, acc, PRECISION)
    _decode_store(
        out, part_acc, part_ml, acc, m, l_sum, row, heads, g_mask, d, num_splits, stride_ot,
        stride_oh, GROUP, HEAD_DIM, BLOCK_D, SPLIT,
    )  # fmt: skip


def sink_rope_table(
    inv_freq: torch.Tensor, num_positions: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """[2, num_positions, head_dim / 2]: cos, then sin, at positions 0, 1, ..., computed as the
    model's table is (float32 angles) and stored in the model dtype as the model applies them."""
    angles = torch.arange(num_positions, dtype=torch.float32, device=device)[:, None]
    angles = angles * inv_freq.float().to(device)
    return torch.stack((angles.cos(), angles.sin())).to(dtype).contiguous()


def paged_sink_decode(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim], unrotated; decode rows are read
    kv_cache: torch.Tensor,  # unrotated keys
    block_tables: torch.Tensor,  # [num_seqs, width] compact (compact_columns)
    seq_lens: torch.Tensor,  # [num_seqs] int32, text length including this token
    out: torch.Tensor,
    scale: float,
    num_splits: int,
    rope: torch.Tensor,  # sink_rope_table(inv_freq, num_sinks + window, ...)
    num_sinks: int,
    window: int,
    token_idx: torch.Tensor | None = None,
) -> None:
    """Attention of one new query per sequence over its sinks and recent window. Grid (num_seqs,
    num_kv_heads, num_splits), split partials merged by the plain decode's reduction kernel.
    Launch shapes depend only on the arguments' shapes: safe to capture in a CUDA graph."""
    num_seqs = block_tables.shape[0]
    if num_seqs == 0:
        return
    _, num_heads, head_dim = query.shape
    _, _, page, num_kv_heads, _ = kv_cache.shape
    assert head_dim % 2 == 0 and rope.shape == (2, num_sinks + window, head_dim // 2)
    group = num_heads // num_kv_heads
    block_d = triton.next_power_of_2(head_dim)
    part_acc, part_ml = decode_partials(num_seqs, num_heads, num_splits, block_d, out)
    idx = token_idx if token_idx is not None else seq_lens  # unused when None
    quant, stride_kb, stride_ks, stride_kh, scales_at = _cache_strides(kv_cache, head_dim)
    _sink_decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        query, kv_cache[0], kv_cache[1], block_tables, seq_lens, idx, out, part_acc, part_ml,
        rope, scale, num_splits,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        stride_kb, stride_ks, stride_kh, block_tables.stride(0),
        SINKS=num_sinks,
        WINDOW=window,
        GROUP=group,
        BLOCK_G=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        HALF=head_dim // 2,
        BLOCK_H=max(16, triton.next_power_of_2(head_dim // 2)),  # tl.dot's smallest K
        BLOCK_D=block_d,
        PAGE=page,
        BLOCK_N=DECODE_BLOCK_N,
        HAS_TOKEN_IDX=token_idx is not None,
        SPLIT=num_splits > 1,
        PRECISION=_precision(query.dtype),
        QUANT=quant,
        SCALES_AT=scales_at,
        num_warps=4,
    )  # fmt: skip
    if num_splits > 1:
        reduce_splits(part_acc, part_ml, token_idx, out, head_dim)
