"""Attention sinks (StreamingLLM) on the GPU fast path.

Decodes run in one Triton launch (`triton_sink_kernels.paged_sink_decode`: unrotated keys
rotated in the kernel by their cache position) and are CUDA-graph capturable like the plain
decodes; prefill chunks, where every query has its own cache (sink_backend.py), keep the
PyTorch computation of `SinkAttentionBackend`. The cache holds unrotated keys either way.

A decode's block table is compact (`triton_sink_kernels.compact_columns`): the sink blocks, then
the window's. The model runner packs graph replays' rows so (`decode_block_ids`); an eager
step's logical tables are compacted here, on the device.
"""

from __future__ import annotations

import torch

from engine.attention.backend import AttentionMetadata, AttentionSpec
from engine.attention.sink_backend import SinkAttentionBackend
from engine.attention.triton_backend import DecodeBatch, TritonAttentionBackend
from engine.attention.triton_sink_kernels import (
    compact_columns,
    max_compact_width,
    paged_sink_decode,
    sink_rope_table,
)


class TritonSinkAttentionBackend(TritonAttentionBackend):
    applies_rope = True

    def __init__(
        self,
        spec: AttentionSpec,
        inv_freq: torch.Tensor,
        num_sink_tokens: int,
        window: int,
        block_size: int,
    ):
        # A decode reads at most S + W keys, whatever the text length: that bounds its splits.
        super().__init__(spec, max_model_len=num_sink_tokens + window)
        self.torch_sinks = SinkAttentionBackend(spec, inv_freq, num_sink_tokens, window)
        self.num_sink_tokens, self.window, self.block_size = num_sink_tokens, window, block_size
        self.table_width = max_compact_width(num_sink_tokens, window, block_size)
        self._rope: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    def decode_block_ids(self, block_ids: list[int], seq_len: int) -> list[int]:
        num_sink_blocks, first = compact_columns(
            seq_len, self.num_sink_tokens, self.window, self.block_size
        )
        return block_ids[:num_sink_blocks] + block_ids[first:]

    def prepare(self, meta: AttentionMetadata) -> None:
        decode_seqs = [i for i in range(meta.num_seqs) if meta.query_len(i) == 1]
        decodes = None
        if decode_seqs:
            n, device = len(decode_seqs), meta.slot_mapping.device
            lens = torch.tensor([meta.seq_lens[i] for i in decode_seqs])
            rows = torch.tensor([meta.query_start_loc[i] for i in decode_seqs])
            host = torch.cat([lens, rows, torch.tensor(decode_seqs)])
            if not meta.decode_rows_packed:  # logical rows: gather the compact columns
                host = torch.cat([host, self._compact_columns(lens, meta).flatten()])
            dev = host.to(device, non_blocking=True)
            if meta.decode_rows_packed:  # a pure-decode step: rows 0..n-1, packed already
                tables = meta.block_tables[:n]
            else:
                seqs, cols = dev[2 * n : 3 * n], dev[3 * n :].view(n, -1)
                tables = meta.block_tables[seqs[:, None], cols]
            contiguous = decode_seqs == list(range(n))  # the runner packs decodes first
            decodes = DecodeBatch(
                seq_lens=dev[:n].to(torch.int32),
                block_tables=tables,
                num_splits=self.num_splits(n, device),
                token_idx=None if contiguous else dev[n : 2 * n],
            )
        meta.backend_data = (decodes, self.torch_sinks.prefill_groups(meta))

    def _compact_columns(self, seq_lens: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """compact_columns for every decode at once: [n, table_width] logical columns."""
        num_sink_blocks = -(-self.num_sink_tokens // meta.block_size)
        first = (seq_lens - self.window).clamp(min=0) // meta.block_size
        first = first.clamp(min=num_sink_blocks)
        j = torch.arange(self.table_width)
        cols = torch.where(j < num_sink_blocks, j, first[:, None] + j - num_sink_blocks)
        return cols.clamp(max=meta.block_tables.shape[1] - 1)  # past the end: never read

    def forward(self, query, key, value, kv_cache, meta, layer=None):
        # NOTE: `key` arrives unrotated (applies_rope) and is cached so.
        self.write(key, value, kv_cache, meta.slot_mapping)
        decodes, prefills = meta.backend_data
        out = torch.empty_like(query)
        if decodes is not None:
            paged_sink_decode(
                query,
                kv_cache,
                decodes.block_tables,
                decodes.seq_lens,
                out,
                self.spec.scale,
                decodes.num_splits,
                self._rope_table(query),
                self.num_sink_tokens,
                self.window,
                decodes.token_idx,
            )
        self.torch_sinks.attend(query, kv_cache, prefills, out)
        return out

    def _rope_table(self, query: torch.Tensor) -> torch.Tensor:
        # NOTE: built by the first forward pass; DecodeGraphs' warm-up runs one before capture,
        # so a graph reads this tensor rather than capturing its construction.
        key = (query.dtype, query.device)
        if key not in self._rope:
            self._rope[key] = sink_rope_table(
                self.torch_sinks.inv_freq,
                self.num_sink_tokens + self.window,
                query.dtype,
                query.device,
            )
        return self._rope[key]

    def decode_graph_data(
        self, seq_lens: torch.Tensor, block_tables: torch.Tensor
    ) -> tuple[DecodeBatch, list]:
        """As TritonAttentionBackend's; the static tables hold compact rows (decode_block_ids)."""
        if block_tables.shape[1] < self.table_width:
            raise ValueError(
                f"attention sinks ({self.num_sink_tokens} + window {self.window}) need decode "
                f"block tables {self.table_width} wide, max_model_len allows "
                f"{block_tables.shape[1]}: raise max_model_len or set enforce_eager"
            )
        n = seq_lens.shape[0]
        return DecodeBatch(seq_lens, block_tables, self.num_splits(n, seq_lens.device)), []
