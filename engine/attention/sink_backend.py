"""Attention sinks (StreamingLLM, Xiao et al. 2023, arXiv:2309.17453) over the paged cache.

The query at text position p attends to the first S tokens (the sinks) and the last W tokens,
itself included:  visible(p) = [0, S) ∪ (p - W, p].  As in the paper, RoPE positions are
positions within that cache, not in the text: the visible keys, in order, sit at 0, 1, 2, ...
and the query last. The paper caches keys before the rotary transform and rotates them by their
cache position at every step; so does this backend (`applies_rope`: the model hands it q and k
unrotated, and the KV cache holds unrotated keys):

    text positions   0 1 2 3 . . . 6 7 8 9       S = 4, W = 4, computing token 9
    cache positions  0 1 2 3       4 5 6 7       (the paper's own example)

Why keys cannot be stored rotated: a recent key's cache position drops by one at every step.

Within a prefill chunk every query has its own cache, so a key's cache position depends on the
query. A RoPE score depends only on the difference of the two positions, and that difference is
p - j for a recent key j (both shift together) and rank(p) - j for a sink j. So a chunk needs two
rotations of each query: at p - c against recent keys rotated at j - c (c: one constant per
sequence, keeping positions small and non-negative), and at its cache position rank(p) against
sinks rotated at j. For a decode (one query, c = its own shift) both are exactly "rotate by the
position in the cache". Positions stay below S + W + the chunk length, whatever the text length.

Plain PyTorch: the CPU path, and on CUDA the reference and the prefill chunks of
`TritonSinkAttentionBackend` (triton_sink_backend.py), whose kernel runs the decodes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.attention.backend import AttentionMetadata, AttentionSpec
from engine.attention.torch_backend import TorchAttentionBackend


@dataclass
class _Group:
    """Sequences attended together: all decodes (one query each), or one prefill chunk."""

    token_rows: torch.Tensor  # [B, Q] rows of the queries in the flat batch
    blocks: torch.Tensor  # [B, num_blocks] sink blocks, then the window's blocks
    visible: torch.Tensor  # [B, 1, Q, L] True where query q sees key l
    key_is_sink: torch.Tensor  # [B, 1, 1, L]
    key_rope: tuple[torch.Tensor, torch.Tensor]  # cos, sin [B, L, 1, D] float32
    sink_rope: tuple[torch.Tensor, torch.Tensor]  # queries at their cache position [B, Q, 1, D]
    recent_rope: tuple[torch.Tensor, torch.Tensor]  # queries at p - c [B, Q, 1, D]


class SinkAttentionBackend(TorchAttentionBackend):
    applies_rope = True

    def __init__(
        self, spec: AttentionSpec, inv_freq: torch.Tensor, num_sink_tokens: int, window: int
    ):
        super().__init__(spec)
        assert num_sink_tokens > 0 and window > 0
        self.inv_freq = inv_freq.float()
        self.num_sink_tokens = num_sink_tokens
        self.window = window

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin at integer positions, computed as the model's table computes them."""
        angles = positions.float()[..., None] * self.inv_freq.to(positions.device)
        emb = torch.cat((angles, angles), dim=-1).unsqueeze(-2)
        return emb.cos(), emb.sin()

    def prepare(self, meta: AttentionMetadata) -> None:
        device = meta.slot_mapping.device
        decodes = [i for i in range(meta.num_seqs) if meta.query_len(i) == 1]
        groups = []
        if decodes:
            rows = torch.tensor([meta.query_start_loc[i] for i in decodes], device=device)
            groups.append(self._group(meta, decodes, rows[:, None]))
        meta.backend_data = groups + self.prefill_groups(meta)

    def prefill_groups(self, meta: AttentionMetadata) -> list[_Group]:
        """One group per prefill chunk (query length > 1) of the step. Also called by the Triton
        sink backend, which runs decodes in its kernel and chunks here."""
        device, groups = meta.slot_mapping.device, []
        for i in range(meta.num_seqs):
            start, end = meta.query_start_loc[i], meta.query_start_loc[i + 1]
            if end - start > 1:
                rows = torch.arange(start, end, device=device)[None]
                groups.append(self._group(meta, [i], rows))
        return groups

    def _group(self, meta: AttentionMetadata, seqs: list[int], token_rows) -> _Group:
        device, bs = token_rows.device, meta.block_size
        sinks, window = self.num_sink_tokens, self.window
        seq_lens = torch.tensor([meta.seq_lens[i] for i in seqs], device=device)
        num_queries = token_rows.shape[1]
        q_pos = seq_lens[:, None] - num_queries + torch.arange(num_queries, device=device)
        # Blocks to read: the sink blocks, then from the block of the first query's first
        # recent key to the last (never a freed block between the two).
        num_sink_blocks = -(-sinks // bs)
        last = (seq_lens - 1) // bs
        first = ((q_pos[:, 0] - window + 1).clamp(min=0) // bs).clamp(min=num_sink_blocks)
        num_window_blocks = max(int((last - first).max()) + 1, 0)
        cols = torch.cat(
            [
                torch.arange(num_sink_blocks, device=device).expand(len(seqs), -1),
                first[:, None] + torch.arange(num_window_blocks, device=device),
            ],
            dim=1,
        )
        col_ok = cols <= last[:, None]
        table = meta.block_tables[seqs]
        blocks = table.gather(1, cols.clamp(max=table.shape[1] - 1))
        key_pos = (cols[:, :, None] * bs + torch.arange(bs, device=device)).flatten(1)  # [B, L]
        key_ok = col_ok.repeat_interleave(bs, dim=1)
        key_is_sink = key_pos < sinks
        recent_start = (q_pos - window + 1).clamp(min=sinks)  # [B, Q]
        kp, qp = key_pos[:, None, :], q_pos[:, :, None]
        visible = (
            key_ok[:, None, :]
            & (kp <= qp)
            & (key_is_sink[:, None, :] | (kp >= recent_start[:, :, None]))
        )
        cache_pos = torch.where(q_pos < sinks, q_pos, sinks + q_pos - recent_start)
        shift = (recent_start[:, :1] - sinks).clamp(min=0)  # c, per sequence
        key_rot = torch.where(key_is_sink, key_pos, key_pos - shift).clamp(min=0)
        return _Group(
            token_rows=token_rows,
            blocks=blocks,
            visible=visible[:, None],
            key_is_sink=key_is_sink[:, None, None, :],
            key_rope=self._rope(key_rot),
            sink_rope=self._rope(cache_pos),
            recent_rope=self._rope(q_pos - shift),
        )

    def forward(self, query, key, value, kv_cache, meta, layer=None):
        # NOTE: `key` arrives unrotated (applies_rope) and is cached so.
        self._write(kv_cache, key, value, meta.slot_mapping)
        out = torch.empty_like(query)
        self.attend(query, kv_cache, meta.backend_data, out)
        return out

    def attend(self, query, kv_cache, groups: list[_Group], out: torch.Tensor) -> None:
        """Writes the groups' rows of `out`: attention of unrotated queries over the cache."""
        for g in groups:
            out[g.token_rows] = self._attend(query[g.token_rows], kv_cache, g)

    def _attend(self, q: torch.Tensor, kv_cache: torch.Tensor, g: _Group) -> torch.Tensor:
        """q [B, Q, H, D] unrotated -> attention output [B, Q, H, D]."""
        dt, spec = q.dtype, self.spec
        group = spec.num_heads // spec.num_kv_heads
        k = _rotate(self._gather(kv_cache[0], g.blocks, dt), g.key_rope)  # [B, L, Hkv, D]
        v = self._gather(kv_cache[1], g.blocks, dt)
        k = k.repeat_interleave(group, dim=2)
        v = v.repeat_interleave(group, dim=2)
        to_sinks = torch.einsum("bqhd,blhd->bhql", _rotate(q, g.sink_rope), k)
        to_recent = torch.einsum("bqhd,blhd->bhql", _rotate(q, g.recent_rope), k)
        scores = torch.where(g.key_is_sink, to_sinks, to_recent).float() * spec.scale
        scores = scores.masked_fill(~g.visible, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(dt)
        return torch.einsum("bhql,blhd->bqhd", probs, v)


def _rotate(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """RoPE as the model applies it (rotate-half convention, cos/sin cast to x's dtype)."""
    cos, sin = (t.to(x.dtype) for t in rope)
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin
