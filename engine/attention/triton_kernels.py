"""Triton kernels over the paged KV cache, and the thin Python launchers that call them.

Cache layout (per layer, as the model runner allocates it):

    kv_cache[0] = K, kv_cache[1] = V, each [num_blocks, block_size, num_kv_heads, head_dim]
    token at slot s lives at block s // block_size, row s % block_size

Every kernel addresses the cache token by token (page = block_table[pos // block_size]), so a
tile of BLOCK_N tokens may span several pages and any power-of-two block size works.

GQA: one program serves one KV head and its whole query group. The group's G query heads are the
rows of the score tile (padded to 16, the smallest `tl.dot` tile), so every K/V row is read once
per group rather than once per query head.

Softmax is the online (flash) form in float32: running max m, running sum l, accumulator acc,
rescaled by exp(m_old - m_new) whenever a tile raises the max. A row that has seen only masked
keys keeps m = -inf; `_safe` keeps exp(-inf - -inf) from producing NaN there.

8-bit KV (kv_cache/quant.py): a block holds its values ([block_size, kv_heads, head_dim] bytes:
int8, or e4m3 bits as uint8) and then its float32 scales ([block_size, kv_heads]). The backend
writes it with torch ops (`quant.write`); the attention kernels dequantize each K/V tile as they
load it (`_load_kv`; QUANT 1 int8, 2 fp8), with the row strides of the values region.

Under TRITON_INTERPRET=1 the same kernels run on CPU tensors (slowly): that is how the default
test suite checks them without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Decode splits the context of each sequence into at most this many parts (flash-decoding).
MAX_DECODE_SPLITS = 16
DECODE_BLOCK_N = 64  # keys per tile in the decode kernel
PREFILL_BLOCK_N = 64  # keys per tile in the prefill kernel
PREFILL_BLOCK_M = 64  # score-tile rows (query tokens x query heads of the group) in prefill


def _precision(dtype: torch.dtype) -> str:
    # float32 engines get exact float32 dots (tf32 would cost ~1e-3 relative error).
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def _safe(m):
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _flash_step(s, v, m, l_sum, acc, PRECISION: tl.constexpr):
    """One tile of the online softmax: scores s [rows, BLOCK_N] (-inf where masked), values v
    [BLOCK_N, BLOCK_D]. Returns the new (m, l_sum, acc)."""
    m_new = _safe(tl.maximum(m, tl.max(s, 1)))
    alpha = tl.exp(m - m_new)
    p = tl.exp(s - m_new[:, None])
    l_sum = l_sum * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_sum, acc


@triton.jit
def _load_kv(
    cache, page_offs, row_offs, d, valid, mask, HEAD_DIM: tl.constexpr, SCALES_AT, QUANT, dtype
):
    """A [BLOCK_N, BLOCK_D] tile of K or V: rows at page_offs + row_offs, in `dtype`. 8-bit: the
    row's scale is float32 number row_offs // HEAD_DIM of the scales at byte SCALES_AT."""
    x = tl.load(cache + (page_offs + row_offs)[:, None] + d[None, :], mask=mask, other=0)
    if QUANT == 0:
        return x
    if QUANT == 2:
        x = x.to(tl.float8e4nv, bitcast=True)
    scale_ptr = (cache + page_offs + SCALES_AT).to(tl.pointer_type(tl.float32))
    scale = tl.load(scale_ptr + row_offs // HEAD_DIM, mask=valid, other=0)
    return (x.to(tl.float32) * scale[:, None]).to(dtype)


def _cache_strides(kv_cache: torch.Tensor, head_dim: int) -> tuple[int, int, int, int, int]:
    """(QUANT code, block, slot and head strides of the K/V rows, byte offset of the scales in a
    block). QUANT 0: model-dtype cache; 1: int8; 2: fp8 (e4m3 bits)."""
    _, _, page, heads, row = kv_cache.shape
    if row == head_dim:
        return 0, kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3), 0
    code = 1 if kv_cache.dtype == torch.int8 else 2
    return code, kv_cache.stride(1), heads * head_dim, head_dim, page * heads * head_dim


# -- KV write ----------------------------------------------------------------------------------


@triton.jit
def _write_kv_kernel(
    key,
    value,
    k_cache,
    v_cache,
    slot_mapping,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cache_slot,
    stride_cache_head,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping + token).to(tl.int64)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    mask = (h < NUM_KV_HEADS)[:, None] & (d < HEAD_DIM)[None, :]
    src_k = key + token * stride_kt + h[:, None] * stride_kh + d[None, :]
    src_v = value + token * stride_vt + h[:, None] * stride_vh + d[None, :]
    dst = slot * stride_cache_slot + h[:, None] * stride_cache_head + d[None, :]
    tl.store(k_cache + dst, tl.load(src_k, mask=mask), mask=mask)
    tl.store(v_cache + dst, tl.load(src_v, mask=mask), mask=mask)


def write_kv(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens]
) -> None:
    """Write each token's K and V at its slot. One program per token."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    assert key.stride(-1) == 1 and value.stride(-1) == 1 and kv_cache.is_contiguous()
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    _write_kv_kernel[(num_tokens,)](
        key,
        value,
        k_cache,
        v_cache,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        num_kv_heads * head_dim,
        head_dim,
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim),
    )


# -- decode: paged attention, split along the context ------------------------------------------


@triton.jit
def _decode_kernel(
    query,
    k_cache,
    v_cache,
    block_tables,
    seq_lens,
    token_idx,
    out,
    part_acc,  # [num_seqs, num_heads, num_splits, BLOCK_D] float32
    part_ml,  # [num_seqs, num_heads, num_splits, 2] float32: running max, running sum
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
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WINDOW: tl.constexpr,
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
    start = tl.maximum(seq_len - WINDOW, 0) if WINDOW > 0 else 0
    # Each split takes a whole number of tiles; trailing splits of a short context get none.
    per_split = tl.cdiv(tl.cdiv(seq_len - start, num_splits), BLOCK_N) * BLOCK_N
    lo = start + split * per_split
    hi = tl.minimum(lo + per_split, seq_len)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    g_mask = g < GROUP
    d_mask = d < HEAD_DIM
    heads = kv_head * GROUP + g
    q = tl.load(
        query + row * stride_qt + heads[:, None] * stride_qh + d[None, :],
        mask=g_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    table = block_tables + seq.to(tl.int64) * stride_bt
    for tile in range(lo, hi, BLOCK_N):
        pos = tile + tl.arange(0, BLOCK_N)
        valid = pos < hi
        page = tl.load(table + pos // PAGE, mask=valid, other=0).to(tl.int64)
        page_offs = page * stride_kb
        row_offs = (pos % PAGE) * stride_ks + kv_head * stride_kh
        kv_mask = valid[:, None] & d_mask[None, :]
        k = _load_kv(
            k_cache, page_offs, row_offs, d, valid, kv_mask, HEAD_DIM, SCALES_AT, QUANT, q.dtype
        )
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        s = tl.where(valid[None, :], s * scale, float("-inf"))
        v = _load_kv(
            v_cache, page_offs, row_offs, d, valid, kv_mask, HEAD_DIM, SCALES_AT, QUANT, q.dtype
        )
        m, l_sum, acc = _flash_step(s, v, m, l_sum, acc, PRECISION)
    _decode_store(
        out, part_acc, part_ml, acc, m, l_sum, row, heads, g_mask, d, num_splits, stride_ot,
        stride_oh, GROUP, HEAD_DIM, BLOCK_D, SPLIT,
    )  # fmt: skip


@triton.jit
def _decode_store(
    out, part_acc, part_ml, acc, m, l_sum, row, heads, g_mask, d, num_splits, stride_ot,
    stride_oh, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    SPLIT: tl.constexpr,
):  # fmt: skip
    """A decode program's result: its split's partial (m, l, acc) for the reduction kernel, or
    with one split the output rows themselves."""
    if SPLIT:
        m = tl.where(l_sum > 0, m, float("-inf"))  # an empty split must weigh nothing
        seq = tl.program_id(0).to(tl.int64)
        base = (seq * tl.num_programs(1) * GROUP + heads) * num_splits + tl.program_id(2)
        tl.store(part_acc + base[:, None] * BLOCK_D + d[None, :], acc, mask=g_mask[:, None])
        tl.store(part_ml + base * 2, m, mask=g_mask)
        tl.store(part_ml + base * 2 + 1, l_sum, mask=g_mask)
    else:
        tl.store(
            out + row * stride_ot + heads[:, None] * stride_oh + d[None, :],
            (acc / l_sum[:, None]).to(out.dtype.element_ty),
            mask=g_mask[:, None] & (d < HEAD_DIM)[None, :],
        )


@triton.jit
def _decode_reduce_kernel(
    part_acc,
    part_ml,
    token_idx,
    out,
    num_splits,
    stride_ot,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    HAS_TOKEN_IDX: tl.constexpr,
):
    """out = sum_i exp(m_i - M) acc_i / sum_i exp(m_i - M) l_i, M = max_i m_i."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    row = tl.load(token_idx + seq).to(tl.int64) if HAS_TOKEN_IDX else seq.to(tl.int64)
    sp = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_mask = sp < num_splits
    base = (seq.to(tl.int64) * tl.num_programs(1) + head) * num_splits + sp
    m = tl.load(part_ml + base * 2, mask=s_mask, other=float("-inf"))
    l_sum = tl.load(part_ml + base * 2 + 1, mask=s_mask, other=0.0)
    acc = tl.load(part_acc + base[:, None] * BLOCK_D + d[None, :], mask=s_mask[:, None], other=0.0)
    m_max = tl.max(m, 0)
    w = tl.exp(m - m_max)  # split 0 always holds keys, so m_max is finite
    o = tl.sum(acc * w[:, None], 0) / tl.sum(l_sum * w, 0)
    tl.store(
        out + row * stride_ot + head * stride_oh + d, o.to(out.dtype.element_ty), mask=d < HEAD_DIM
    )


def decode_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, num_sms: int) -> int:
    """Enough (sequence, KV head, split) programs to fill the GPU twice over, but no split shorter
    than one tile of the longest context the batch may have."""
    wanted = triton.cdiv(2 * num_sms, max(1, num_seqs * num_kv_heads))
    return max(1, min(wanted, MAX_DECODE_SPLITS, triton.cdiv(max_seq_len, DECODE_BLOCK_N)))


def paged_decode(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]; the decode rows are read
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks]
    seq_lens: torch.Tensor,  # [num_seqs] int32, context length including this token
    out: torch.Tensor,  # like query; the decode rows are written
    scale: float,
    num_splits: int,
    token_idx: torch.Tensor | None = None,  # [num_seqs] row of each decode; None: rows 0..n-1
    sliding_window: int | None = None,
) -> None:
    """Attention of one new query token per sequence over its cached context.

    Grid (num_seqs, num_kv_heads, num_splits). With num_splits > 1 each program writes a partial
    (max, sum, acc) and a second kernel merges them. Launch shapes depend only on the arguments'
    shapes and `num_splits`, never on the values: safe to capture in a CUDA graph."""
    num_seqs = block_tables.shape[0]
    if num_seqs == 0:
        return
    _, num_heads, head_dim = query.shape
    _, _, page, num_kv_heads, _ = kv_cache.shape
    group = num_heads // num_kv_heads
    block_d = triton.next_power_of_2(head_dim)
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    split = num_splits > 1
    part_acc, part_ml = decode_partials(num_seqs, num_heads, num_splits, block_d, out)
    idx = token_idx if token_idx is not None else seq_lens  # unused when None
    quant, stride_kb, stride_ks, stride_kh, scales_at = _cache_strides(kv_cache, head_dim)
    _decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        query,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        idx,
        out,
        part_acc,
        part_ml,
        scale,
        num_splits,
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        stride_kb,
        stride_ks,
        stride_kh,
        block_tables.stride(0),
        GROUP=group,
        BLOCK_G=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        PAGE=page,
        BLOCK_N=DECODE_BLOCK_N,
        WINDOW=sliding_window or 0,
        HAS_TOKEN_IDX=token_idx is not None,
        SPLIT=split,
        PRECISION=_precision(query.dtype),
        QUANT=quant,
        SCALES_AT=scales_at,
        num_warps=4,
    )
    if split:
        reduce_splits(part_acc, part_ml, token_idx, out, head_dim)


def decode_partials(
    num_seqs: int, num_heads: int, num_splits: int, block_d: int, out: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-K partials (acc, and running max and sum) of a decode launch; with one split there
    are none (`out` stands in, unused)."""
    if num_splits == 1:
        return out, out
    shape, device = (num_seqs, num_heads, num_splits), out.device
    return (
        torch.empty((*shape, block_d), dtype=torch.float32, device=device),
        torch.empty((*shape, 2), dtype=torch.float32, device=device),
    )


def reduce_splits(part_acc, part_ml, token_idx, out: torch.Tensor, head_dim: int) -> None:
    """Merge a decode launch's split partials into its output rows."""
    num_seqs, num_heads, num_splits, block_d = part_acc.shape
    idx = token_idx if token_idx is not None else part_ml  # unused when None
    _decode_reduce_kernel[(num_seqs, num_heads)](
        part_acc,
        part_ml,
        idx,
        out,
        num_splits,
        out.stride(0),
        out.stride(1),
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_S=triton.next_power_of_2(num_splits),
        HAS_TOKEN_IDX=token_idx is not None,
        num_warps=4,
    )


# -- prefill over cached pages -----------------------------------------------------------------


@triton.jit
def _prefill_kernel(
    query,
    k_cache,
    v_cache,
    block_tables,
    out,
    tile_seq,  # [num_tiles] which prefill sequence the tile belongs to
    tile_start,  # [num_tiles] first query of the tile, counted within its chunk
    q_start,  # [num_prefills] first row of the chunk in the flat batch
    q_lens,  # [num_prefills]
    seq_lens,  # [num_prefills] context length once this chunk is written
    table_row,  # [num_prefills] the sequence's row in block_tables
    scale,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_bt,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WINDOW: tl.constexpr,
    PRECISION: tl.constexpr,
    QUANT: tl.constexpr,
    SCALES_AT: tl.constexpr,
):
    """A tile of BLOCK_Q query tokens x the G query heads of one KV head, against the chunk's
    whole context in the cache (the cached prefix and the chunk itself), causal:

        keys    | cached prefix (ctx)          | this chunk (q_len)   |
        query i of the chunk sees keys [0, ctx + i]
    """
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    s = tl.load(tile_seq + tile)
    t0 = tl.load(tile_start + tile)
    first_row = tl.load(q_start + s).to(tl.int64)
    q_len = tl.load(q_lens + s)
    seq_len = tl.load(seq_lens + s)
    ctx = seq_len - q_len

    r = tl.arange(0, BLOCK_Q * BLOCK_G)
    tok = t0 + r // BLOCK_G
    g = r % BLOCK_G
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    row_mask = (tok < q_len) & (g < GROUP)
    heads = kv_head * GROUP + g
    q_offs = (first_row + tok) * stride_qt + heads * stride_qh
    q = tl.load(
        query + q_offs[:, None] + d[None, :], mask=row_mask[:, None] & d_mask[None, :], other=0.0
    )
    q_pos = ctx + tok

    m = tl.full([BLOCK_Q * BLOCK_G], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_Q * BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_Q * BLOCK_G, BLOCK_D], tl.float32)
    hi = tl.minimum(ctx + t0 + BLOCK_Q, seq_len)
    lo = 0
    first_key = 0
    if WINDOW > 0:
        # NOTE: keys before the tile's first visible one are never loaded, not only masked: their
        # blocks may be back in the pool (kv_cache/window.py), the table slot a placeholder.
        first_key = tl.maximum(ctx + t0 - WINDOW + 1, 0)
        lo = first_key // BLOCK_N * BLOCK_N
    table = block_tables + tl.load(table_row + s).to(tl.int64) * stride_bt
    for tile_pos in range(lo, hi, BLOCK_N):
        pos = tile_pos + tl.arange(0, BLOCK_N)
        valid = (pos < hi) & (pos >= first_key)
        page = tl.load(table + pos // PAGE, mask=valid, other=0).to(tl.int64)
        page_offs = page * stride_kb
        row_offs = (pos % PAGE) * stride_ks + kv_head * stride_kh
        kv_mask = valid[:, None] & d_mask[None, :]
        k = _load_kv(
            k_cache, page_offs, row_offs, d, valid, kv_mask, HEAD_DIM, SCALES_AT, QUANT, q.dtype
        )
        sc = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        seen = valid[None, :] & (pos[None, :] <= q_pos[:, None])
        if WINDOW > 0:
            seen = seen & (pos[None, :] > q_pos[:, None] - WINDOW)
        sc = tl.where(seen, sc * scale, float("-inf"))
        m_new = _safe(tl.maximum(m, tl.max(sc, 1)))
        alpha = tl.exp(m - m_new)
        p = tl.exp(sc - m_new[:, None])
        l_sum = l_sum * alpha + tl.sum(p, 1)
        v = _load_kv(
            v_cache, page_offs, row_offs, d, valid, kv_mask, HEAD_DIM, SCALES_AT, QUANT, q.dtype
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
    o = acc / tl.where(l_sum > 0, l_sum, 1.0)[:, None]
    o_offs = (first_row + tok) * stride_ot + heads * stride_oh
    tl.store(
        out + o_offs[:, None] + d[None, :],
        o.to(out.dtype.element_ty),
        mask=row_mask[:, None] & d_mask[None, :],
    )


def prefill_block_q(num_heads: int, num_kv_heads: int, block_m: int = PREFILL_BLOCK_M) -> int:
    """Query tokens per prefill tile: the tile's rows are tokens x the (padded) query group."""
    block_g = triton.next_power_of_2(num_heads // num_kv_heads)
    return max(1, block_m // block_g)


def paged_prefill(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    out: torch.Tensor,
    scale: float,
    tile_seq: torch.Tensor,
    tile_start: torch.Tensor,
    q_start: torch.Tensor,
    q_lens: torch.Tensor,
    seq_lens: torch.Tensor,
    table_row: torch.Tensor,
    sliding_window: int | None = None,
    block_m: int = PREFILL_BLOCK_M,
    num_warps: int = 4,
    num_stages: int | None = None,
) -> None:
    """Causal attention of prefill chunks over their whole context, read in place from the cache
    (the chunk's own K/V must already be written). One launch for all chunks: grid
    (num_tiles, num_kv_heads); tiles come from `prefill_block_q` with the same `block_m`.
    `block_m`, `num_warps`, `num_stages` (None: Triton's default): for benchmarks' sweeps."""
    num_tiles = tile_seq.shape[0]
    if num_tiles == 0:
        return
    _, num_heads, head_dim = query.shape
    _, _, page, num_kv_heads, _ = kv_cache.shape
    group = num_heads // num_kv_heads
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    quant, stride_kb, stride_ks, stride_kh, scales_at = _cache_strides(kv_cache, head_dim)
    _prefill_kernel[(num_tiles, num_kv_heads)](
        query,
        k_cache,
        v_cache,
        block_tables,
        out,
        tile_seq,
        tile_start,
        q_start,
        q_lens,
        seq_lens,
        table_row,
        scale,
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        stride_kb,
        stride_ks,
        stride_kh,
        block_tables.stride(0),
        GROUP=group,
        BLOCK_G=triton.next_power_of_2(group),
        BLOCK_Q=prefill_block_q(num_heads, num_kv_heads, block_m),
        HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim),
        PAGE=page,
        BLOCK_N=PREFILL_BLOCK_N,
        WINDOW=sliding_window or 0,
        PRECISION=_precision(query.dtype),
        QUANT=quant,
        SCALES_AT=scales_at,
        num_warps=num_warps,
        **({} if num_stages is None else {"num_stages": num_stages}),
    )
