"""Prefill chunks over a cached prefix through SDPA: gather each chunk's context out of the pages
into contiguous K/V, then flash attention with the causal mask aligned to the lower right.

    chunk i's context, all in the cache once write_kv has run:
        | cached prefix (ctx_i)          | the chunk itself (q_len_i) |
        slots of positions [0, seq_len_i) -> rows cu_k[i] : cu_k[i + 1] of the gathered K and V
        query j of the chunk sees keys [0, ctx_i + j]: causal, aligned to the lower right

The alternative to `triton_kernels.paged_prefill`, which reads the pages in place. The gather
costs one copy of the context per layer (read + write of 4 * kv_heads * head_dim bytes a token in
bf16, K and V); attention costs 4 * heads * head_dim FLOPs per (query, key) pair. So the copy's
share of the attention time falls as the chunk grows (the rule: `TritonAttentionBackend`'s
`sdpa_prefill_min_tokens`), and flash's speed pays for it once the chunk has a few hundred
queries (benchmarks/prefill_attention.py measures both).

On CUDA with fp16 / bf16 one varlen flash call serves every chunk of the step (FA2's causal flag
is lower-right when seqlen_q != seqlen_k, per sequence); elsewhere (CPU, float32) one SDPA call
per chunk with `causal_lower_right`, which PyTorch sends to flash, else to the efficient kernel,
else to a materialised mask. 8-bit caches are dequantized by the gather.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from engine.attention.backend import AttentionMetadata
from engine.kv_cache import quant


@dataclass
class GatheredChunks:
    """The chunks of a step that go through gather + SDPA (built once per step, read by every
    layer)."""

    q_ranges: list[tuple[int, int]]  # (start, end) of each chunk's rows in the flat batch
    kv_lens: list[int]  # each chunk's context length, itself included (seq_len)
    slots: torch.Tensor  # [sum(kv_lens)] int64 cache slots of the contexts, chunk after chunk
    cu_q: torch.Tensor  # [n + 1] int32 offsets of the chunks' queries once packed (varlen)
    cu_k: torch.Tensor  # [n + 1] int32 offsets of their contexts in the gathered K/V
    q_rows: torch.Tensor | None  # [sum(q_lens)] the chunks' rows; None: one contiguous range


def gather_chunks(meta: AttentionMetadata, seqs: list[int]) -> GatheredChunks:
    """Index tensors for sequences `seqs` of the step (tensor ops on the device, one upload)."""
    device = meta.block_tables.device
    q_ranges = [(meta.query_start_loc[i], meta.query_start_loc[i + 1]) for i in seqs]
    kv_lens = [meta.seq_lens[i] for i in seqs]
    n, total_k = len(seqs), sum(kv_lens)
    q_lens = torch.tensor([end - start for start, end in q_ranges])
    host = torch.cat(
        [
            torch.tensor(seqs + kv_lens),
            torch.nn.functional.pad(q_lens.cumsum(0), (1, 0)),
            torch.nn.functional.pad(torch.tensor(kv_lens).cumsum(0), (1, 0)),
        ]
    )
    dev = host.to(device, non_blocking=True)
    rows, lens, cu = dev[:n], dev[n : 2 * n], dev[2 * n :].to(torch.int32)
    cu_q, cu_k = cu[: n + 1], cu[n + 1 :]
    chunk = torch.repeat_interleave(torch.arange(n, device=device), lens, output_size=total_k)
    pos = torch.arange(total_k, device=device) - cu_k[:-1][chunk]
    bs = meta.block_size
    slots = meta.block_tables[rows[chunk], pos // bs] * bs + pos % bs
    contiguous = all(q_ranges[j][1] == q_ranges[j + 1][0] for j in range(n - 1))
    q_rows = None
    if not contiguous:
        q_rows = torch.cat([torch.arange(s, e) for s, e in q_ranges]).to(device, non_blocking=True)
    return GatheredChunks(q_ranges, kv_lens, slots, cu_q, cu_k, q_rows)


def read_slots(cache: torch.Tensor, slots: torch.Tensor, kind: str, dtype) -> torch.Tensor:
    """K or V at `slots`: one half of a layer's cache [num_blocks, block_size, kv_heads, row] ->
    [len(slots), kv_heads, head_dim] in `dtype` (8-bit caches dequantized)."""
    num_blocks, block_size, kv_heads, row = cache.shape
    if not quant.is_quantized(kind):
        # Rows of kv_heads * head_dim through index_select: one contiguous copy per token.
        return cache.view(-1, kv_heads * row).index_select(0, slots).view(-1, kv_heads, row)
    values, scales = quant.split_blocks(cache)
    block, offset = slots // block_size, slots % block_size
    return quant.dequantize(values[block, offset], scales[block, offset], kind, dtype)


@functools.cache
def _flash_capable(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (8, 0)


def can_use_varlen(query: torch.Tensor) -> bool:
    """True when one varlen flash call can serve the chunks (FA2: sm80+, fp16 / bf16, head_dim a
    multiple of 8 up to 256)."""
    head_dim = query.shape[-1]
    return (
        query.is_cuda
        and query.dtype in (torch.float16, torch.bfloat16)
        and head_dim % 8 == 0
        and head_dim <= 256
        and _flash_capable(query.device.index or 0)
    )


def gathered_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    kv_cache: torch.Tensor,
    chunks: GatheredChunks,
    out: torch.Tensor,  # like query; the chunks' rows are written
    scale: float,
    kv_cache_dtype: str = "auto",
    varlen: bool = True,
) -> None:
    """Causal attention of the chunks over their whole contexts (their own K/V written already):
    gather the contexts, then SDPA. `varlen` False forces one SDPA call per chunk."""
    key = read_slots(kv_cache[0], chunks.slots, kv_cache_dtype, query.dtype)
    value = read_slots(kv_cache[1], chunks.slots, kv_cache_dtype, query.dtype)
    if varlen and can_use_varlen(query):
        first, last = chunks.q_ranges[0][0], chunks.q_ranges[-1][1]
        q = query[first:last] if chunks.q_rows is None else query.index_select(0, chunks.q_rows)
        max_q = max(end - start for start, end in chunks.q_ranges)
        # NOTE: a private op (stable since torch 2.2 in these arguments); `is_causal` here means
        # lower-right per sequence, which is the mask we need.
        o = torch.ops.aten._flash_attention_forward(
            q, key, value, chunks.cu_q, chunks.cu_k, max_q, max(chunks.kv_lens), 0.0, True,
            False, scale=scale,
        )[0]  # fmt: skip
        if chunks.q_rows is None:
            out[first:last] = o
        else:
            out.index_copy_(0, chunks.q_rows, o)
        return
    k_start = 0
    for (start, end), kv_len in zip(chunks.q_ranges, chunks.kv_lens):
        q = query[start:end].transpose(0, 1).unsqueeze(0)  # [1, H, q, D]
        k = key[k_start : k_start + kv_len].transpose(0, 1).unsqueeze(0)  # [1, Hkv, kv, D]
        v = value[k_start : k_start + kv_len].transpose(0, 1).unsqueeze(0)
        mask = causal_lower_right(end - start, kv_len)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        out[start:end] = o[0].transpose(0, 1)
        k_start += kv_len
