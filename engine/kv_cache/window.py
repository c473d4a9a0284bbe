"""Which of a request's KV blocks attention can still read: the rolling buffer of sliding-window
attention and of attention sinks (StreamingLLM).

The query at position p attends to keys

    sliding window      (p - window, p]
    attention sinks     [0, num_sink_tokens)  and  (p - window, p]

so, once the next token to compute sits at `next_pos`, no query will ever read a key below
`next_pos - window + 1` again, sinks apart. A block wholly below that goes back to the pool:

    positions   | 0 .. 15 | 16 .. 31 | 32 .. 47 | 48 .. 63 | 64 ..
    blocks      |  sink   |  (freed)  | (freed)  |  live    | live ..   window 20, next_pos 70
                                                 ^ first live block: (70 - 20 + 1) // 16 = 3

The block table keeps its logical indexing: a freed slot holds `NULL_BLOCK_ID` (see manager.py),
which attention never reads. Every layer shares a block, so blocks are freed only when every
layer is windowed, with the largest window: one global layer keeps the whole sequence.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KVWindow:
    block_size: int
    # Keys a query sees behind it, itself included; None: every layer sees the whole sequence.
    window: int | None = None
    num_sink_tokens: int = 0

    @property
    def frees_blocks(self) -> bool:
        return self.window is not None

    @property
    def num_sink_blocks(self) -> int:
        return -(-self.num_sink_tokens // self.block_size)

    def first_live_block(self, next_pos: int) -> int:
        """The lowest block past the sinks that a query at `next_pos` or later may read."""
        if self.window is None:
            return 0
        return max(next_pos - self.window + 1, 0) // self.block_size

    def is_live(self, block_index: int, next_pos: int) -> bool:
        return block_index < self.num_sink_blocks or block_index >= self.first_live_block(next_pos)

    def num_live_blocks(self, num_tokens: int, next_pos: int) -> int:
        """How many of the first ceil(num_tokens / block_size) blocks are live at `next_pos`."""
        total = -(-num_tokens // self.block_size)
        dead_end = min(self.first_live_block(next_pos), total)
        return total - max(dead_end - self.num_sink_blocks, 0)

    def peak_blocks(self, num_tokens: int, max_chunk_tokens: int) -> int:
        """An upper bound on the blocks a request of `num_tokens` tokens holds at once, computing
        at most `max_chunk_tokens` per step: the window, the chunk, a partial block, the sinks."""
        full = -(-num_tokens // self.block_size)
        if self.window is None:
            return full
        rolling = -(-(self.window + max_chunk_tokens) // self.block_size) + 1
        return min(full, rolling + self.num_sink_blocks)
