"""Attention over the paged cache in plain PyTorch (the CPU path, and the reference for kernels).

Decodes of all lengths run as one SDPA call over their gathered pages, padded to the longest
context and masked; each prefill chunk runs as its own SDPA call with a causal mask shifted by
the context already in the cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.attention.backend import AttentionBackend, AttentionMetadata


@dataclass
class _Decodes:
    token_idx: torch.Tensor  # [num_decodes] positions of the decode tokens in the flat batch
    block_tables: torch.Tensor  # [num_decodes, max_blocks]
    mask: torch.Tensor  # [num_decodes, 1, 1, max_blocks * block_size] True where attended


@dataclass
class _Prefill:
    start: int
    end: int
    blocks: torch.Tensor  # [num_blocks] the blocks holding the whole context, in order
    seq_len: int
    mask: torch.Tensor | None  # [1, 1, query_len, seq_len], None when plainly causal


def gather_blocks(cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """[..., num_blocks] block ids -> [..., num_blocks * block_size, kv_heads, head_dim].

    Whole blocks as rows of a 2-D view through `index_select` (a row memcpy each): on CPU this is
    about 5x faster than advanced indexing slot by slot."""
    num_blocks, block_size, kv_heads, head_dim = cache.shape
    rows = cache.view(num_blocks, -1).index_select(0, block_ids.reshape(-1))
    return rows.view(*block_ids.shape[:-1], block_ids.shape[-1] * block_size, kv_heads, head_dim)


class TorchAttentionBackend(AttentionBackend):
    def prepare(self, meta: AttentionMetadata) -> None:
        window = self.spec.sliding_window
        device = meta.slot_mapping.device
        decode_seqs = [i for i in range(meta.num_seqs) if meta.query_len(i) == 1]
        prefill_seqs = [i for i in range(meta.num_seqs) if meta.query_len(i) > 1]
        bs = meta.block_size
        decodes = None
        if decode_seqs:
            lens = torch.tensor([meta.seq_lens[i] for i in decode_seqs], device=device)
            num_blocks = -(-int(lens.max()) // bs)
            tables = meta.block_tables[decode_seqs, :num_blocks]
            pos = torch.arange(num_blocks * bs, device=device)
            visible = pos[None, :] < lens[:, None]
            if window is not None:
                visible &= pos[None, :] >= lens[:, None] - window
            token_idx = torch.tensor([meta.query_start_loc[i] for i in decode_seqs], device=device)
            decodes = _Decodes(token_idx, tables, visible[:, None, None, :])
        prefills = []
        for i in prefill_seqs:
            start, end, seq_len = (
                meta.query_start_loc[i],
                meta.query_start_loc[i + 1],
                meta.seq_lens[i],
            )
            blocks = meta.block_tables[i, : -(-seq_len // bs)]
            query_len = end - start
            mask = None
            if query_len != seq_len or window is not None:
                pos = torch.arange(seq_len, device=device)
                q_pos = pos[seq_len - query_len :, None]
                mask = pos[None, :] <= q_pos
                if window is not None:
                    mask &= pos[None, :] > q_pos - window
                mask = mask[None, None]
            prefills.append(_Prefill(start, end, blocks, seq_len, mask))
        meta.backend_data = (decodes, prefills)

    def forward(self, query, key, value, kv_cache, meta):
        spec = self.spec
        k_flat = kv_cache[0].view(-1, spec.num_kv_heads, spec.head_dim)
        v_flat = kv_cache[1].view(-1, spec.num_kv_heads, spec.head_dim)
        k_flat[meta.slot_mapping] = key
        v_flat[meta.slot_mapping] = value
        decodes, prefills = meta.backend_data
        out = torch.empty_like(query)
        if decodes is not None:
            q = query[decodes.token_idx].unsqueeze(2)  # [B, H, 1, D]
            k = gather_blocks(kv_cache[0], decodes.block_tables).transpose(1, 2)  # [B, Hkv, L, D]
            v = gather_blocks(kv_cache[1], decodes.block_tables).transpose(1, 2)
            o = F.scaled_dot_product_attention(
                q, k, v, attn_mask=decodes.mask, scale=spec.scale, enable_gqa=True
            )
            out[decodes.token_idx] = o.squeeze(2)
        for p in prefills:
            q = query[p.start : p.end].transpose(0, 1).unsqueeze(0)  # [1, H, q, D]
            k = gather_blocks(kv_cache[0], p.blocks)[: p.seq_len].transpose(0, 1).unsqueeze(0)
            v = gather_blocks(kv_cache[1], p.blocks)[: p.seq_len].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=p.mask,
                is_causal=p.mask is None,
                scale=spec.scale,
                enable_gqa=True,
            )
            out[p.start : p.end] = o[0].transpose(0, 1)
        return out
