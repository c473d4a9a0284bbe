"""The seam between the model and the attention kernels.

The model runner builds one `AttentionMetadata` per step; the backend's `prepare` turns it into
whatever index tensors its kernels want (once per step, shared by every layer); `forward` is
called by every attention layer. The CPU path (`TorchAttentionBackend`) is plain PyTorch; the
GPU kernels plug in here as another backend.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class AttentionMetadata:
    """How the step's flattened tokens map onto sequences and cache slots.

    Tokens of all scheduled sequences are packed without padding:

        tokens       | s0 | s1 | s2 s2 s2 s2 s2 | s3 s3 |
        query_start  0    1    2              7       9

    `seq_lens[i]` counts sequence i's tokens in the cache once this step's KV is written
    (already computed + this step's). A sequence whose query length is 1 is a decode.
    """

    slot_mapping: torch.Tensor  # [num_tokens] int64: where each token's K and V are written
    query_start_loc: list[int]  # [num_seqs + 1]
    seq_lens: list[int]  # [num_seqs]
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int64, padded with 0
    block_size: int
    backend_data: Any = None  # filled by AttentionBackend.prepare
    # True when the decode rows of `block_tables` are `AttentionBackend.decode_block_ids` of each
    # sequence's blocks (a decode-rows step, engine.decode_graphs.DecodeRows), not the whole row.
    decode_rows_packed: bool = False

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    def query_len(self, i: int) -> int:
        return self.query_start_loc[i + 1] - self.query_start_loc[i]


@dataclass(frozen=True)
class AttentionSpec:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    sliding_window: int | None = None
    # "auto", or "fp8" / "int8": the cache holds 8-bit rows with their scales (kv_cache/quant.py)
    kv_cache_dtype: str = "auto"
    # Per-layer windows (alternating local and global layers): layer i attends with
    # layer_windows[i] (None: global). Empty: every layer uses `sliding_window`.
    layer_windows: tuple[int | None, ...] = ()

    def window_of(self, layer: int | None) -> int | None:
        if layer is None or not self.layer_windows:
            return self.sliding_window
        return self.layer_windows[layer]

    @property
    def windows(self) -> tuple[int | None, ...]:
        """The distinct windows the layers use (a backend prepares its masks once for each)."""
        return tuple(dict.fromkeys(self.layer_windows)) or (self.sliding_window,)


class AttentionBackend(ABC):
    # True when `forward` takes q and k before RoPE and rotates them itself (attention sinks:
    # positions counted within the cache); the model then skips its own rotation.
    applies_rope = False

    def __init__(self, spec: AttentionSpec):
        self.spec = spec

    @abstractmethod
    def prepare(self, meta: AttentionMetadata) -> None:
        """Called by the model runner once per step, before the forward pass. Sets
        `meta.backend_data`; must not touch the KV cache."""

    def decode_block_ids(self, block_ids: list[int], seq_len: int) -> list[int]:
        """The block-table row a decode of context length `seq_len` reads, as the model runner
        packs it into a CUDA graph's static tables: the whole row, unless the backend's kernel
        reads a compact one (attention sinks: triton_sink_backend.py)."""
        return block_ids

    @abstractmethod
    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        value: torch.Tensor,
        # [2, num_blocks, block_size, num_kv_heads, head_dim (+ 4 scale bytes when quantized)]
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        layer: int | None = None,
    ) -> torch.Tensor:
        """Called by each attention layer (`layer`: its index, which picks its window in
        `spec.layer_windows`): writes this step's K and V into `kv_cache` at
        `meta.slot_mapping`, then returns attention over each sequence's cached context,
        [num_tokens, num_heads, head_dim]."""
