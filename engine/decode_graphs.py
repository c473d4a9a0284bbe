"""Steps of one-token decode rows: their inputs packed in one upload, run in a CUDA graph.

A decode row is one query token: its id, position, cache slot, context length (position + 1)
and the block-table row its attention reads. Plain decoding is one row per sequence. A request
verifying d drafts at position p (speculative decoding) is d + 1 rows of the same sequence, and
so is a short chunk that a draft model catches up on:

    row         |  j = 0   |  1  |  2  | ... |   d   |
    token       |  t_last  |  d1 |  d2 | ... |   dd  |
    position    |  p       | p+1 | p+2 | ... |  p+d  |
    context     |  p+1     | p+2 | p+3 | ... | p+d+1 |      table: the sequence's own row

Every layer writes all rows' K/V at their slots before attending, and each row attends over its
own context only, so the rows compute exactly what one chunk of d + 1 causal queries computes,
and a verify step is a pure-decode step of sum(d + 1) rows: it replays a `DecodeGraphs` bucket.
The model runner (its verify and decode steps) and the draft model (its own decode passes) both
run their steps so, eagerly with the very same inputs when no graph applies.
"""

from __future__ import annotations

import logging

import torch

from engine.attention.backend import AttentionBackend, AttentionMetadata
from engine.kv_cache import NULL_BLOCK_ID

log = logging.getLogger(__name__)

# Row counts with a captured graph: those below the largest, then the largest itself.
_GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def graph_sizes(max_rows: int) -> list[int]:
    """The buckets of a `DecodeGraphs` whose largest holds `max_rows` rows."""
    return [b for b in _GRAPH_BATCH_SIZES if b < max_rows] + [max_rows]


class DecodeRows:
    """The rows of one pure-decode step, built on the host, then packed into one flat int64
    list (`flat`) that a single upload moves, and read back as model inputs (`unpack`).

    Rows past the real ones are padding for a graph bucket: token 0 at position 0, written to
    the scratch block (which no request owns), context length 1. A real row's table is padded
    with NULL_BLOCK_ID, never read.

        flat  | ids (b) | positions (b) | slots (b) | block tables (b x width) | lens (b) |
    """

    def __init__(self, block_size: int, backend: AttentionBackend):
        self.block_size, self.backend = block_size, backend
        self.ids: list[int] = []
        self.positions: list[int] = []
        self.slots: list[int] = []
        self.lens: list[int] = []
        self.tables: list[list[int]] = []
        self.pad_to = self.width = 0

    @property
    def num_rows(self) -> int:
        return len(self.ids)

    def add(self, token_ids: list[int], position: int, block_ids: list[int]) -> None:
        """Rows for `token_ids` of one sequence at consecutive positions from `position`, whose
        KV slots are in `block_ids` (allocated up to the last). Each row's table is what the
        backend's decode kernel reads at its own context length (attention sinks: the sink
        blocks and that row's window), cut after the row's last block, so that no row is wider
        than a decode's at that length (a graph's static tables hold that)."""
        bs = self.block_size
        for j, token in enumerate(token_ids):
            pos = position + j
            self.ids.append(token)
            self.positions.append(pos)
            self.slots.append(block_ids[pos // bs] * bs + pos % bs)
            self.lens.append(pos + 1)
            num_blocks = pos // bs + 1
            own = block_ids if len(block_ids) == num_blocks else block_ids[:num_blocks]
            self.tables.append(self.backend.decode_block_ids(own, pos + 1))

    def flat(self, pad_to: int, scratch_block: int) -> list[int]:
        """The packed layout above, padded to `pad_to` rows (>= num_rows)."""
        extra = pad_to - self.num_rows
        assert extra >= 0, "more rows than the bucket"
        self.pad_to = pad_to
        self.width = width = max(len(row) for row in self.tables)
        tables: list[int] = []
        for row in self.tables:
            tables += row
            tables += [NULL_BLOCK_ID] * (width - len(row))
        bs = self.block_size
        return (
            self.ids + [0] * extra + self.positions + [0] * extra
            + self.slots + [scratch_block * bs] * extra
            + tables + [scratch_block] * (extra * width) + self.lens + [1] * extra
        )  # fmt: skip

    def unpack(self, staged: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """`flat`'s list as a tensor (on the device) -> (input ids, positions, metadata), padded
        rows included; `meta.seq_lens` is the real rows' only, `meta.backend_data` the padded
        lens (what a graph replay copies)."""
        b, width = self.pad_to, self.width
        meta = AttentionMetadata(
            slot_mapping=staged[2 * b : 3 * b],
            query_start_loc=list(range(self.num_rows + 1)),
            seq_lens=self.lens,
            block_tables=staged[3 * b : 3 * b + b * width].view(b, width),
            block_size=self.block_size,
            backend_data=staged[3 * b + b * width :],
            decode_rows_packed=True,
        )
        return staged[:b], staged[b : 2 * b], meta


class Stager:
    """Moves a step's host-built index tensors to the device in one non-blocking copy through a
    pinned buffer (on CPU it hands them back as they are)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.pinned: torch.Tensor | None = None
        self.staged: torch.Tensor | None = None
        self.copied: torch.cuda.Event | None = None

    def upload(self, parts: list[torch.Tensor]) -> list[torch.Tensor]:
        """int64 host tensors -> device tensors of the same shapes. They live in one device
        buffer that the next upload overwrites (in stream order, after this step's kernels)."""
        if self.device.type != "cuda":
            return parts
        total = sum(p.numel() for p in parts)
        # NOTE: the previous step's copy may still be reading the pinned buffer (a step that
        # samples nothing never synchronizes); wait for it before writing.
        if self.copied is not None:
            self.copied.synchronize()
        if self.pinned is None or self.pinned.numel() < total:
            size = max(total, 2 * (0 if self.pinned is None else self.pinned.numel()), 1 << 14)
            self.pinned = torch.empty(size, dtype=torch.int64, pin_memory=True)
            self.staged = torch.empty(size, dtype=torch.int64, device=self.device)
        torch.cat([p.reshape(-1) for p in parts], out=self.pinned[:total])
        self.staged[:total].copy_(self.pinned[:total], non_blocking=True)
        self.copied = torch.cuda.Event()
        self.copied.record()
        out, offset = [], 0
        for p in parts:
            out.append(self.staged[offset : offset + p.numel()].view(p.shape))
            offset += p.numel()
        return out


class DecodeGraphs:
    """CUDA graphs of pure-decode steps, one per row-count bucket: the forward pass, the output
    head and the argmax, so a greedy step needs nothing else on the GPU. Used by the model
    runner (decode and verify steps) and by the draft model (its decode passes).

    A step of n rows replays the smallest bucket b >= n. Its inputs (`DecodeRows`) are copied
    into the static buffers the graph reads; rows n..b-1 are padding (token 0 at position 0,
    context length 1, K/V written into the scratch block, the cache's last, which no request
    owns), and their outputs are dropped:

        rows     | n real rows               | b - n padding -> scratch block |
        tables   | the requests' blocks      | [scratch, scratch, ...]        |
    """

    def __init__(
        self,
        model,
        backend: AttentionBackend,
        kv_caches: list[torch.Tensor],
        sizes: list[int],
        block_size: int,
        max_model_len: int,
    ):
        self.sizes = sizes
        largest = sizes[-1]
        device, bs = kv_caches[0].device, block_size
        width = -(-max_model_len // bs)
        self.scratch_block = scratch = kv_caches[0].shape[1] - 1
        self.input_ids = torch.zeros(largest, dtype=torch.int64, device=device)
        self.positions = torch.zeros(largest, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((largest,), scratch * bs, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(largest, dtype=torch.int32, device=device)
        self.block_tables = torch.full((largest, width), scratch, dtype=torch.int64, device=device)
        # Per bucket: the graph, and its outputs (logits, argmax token ids), b rows each.
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        pool = None
        with torch.inference_mode():
            for b in reversed(sizes):  # largest first: the smaller ones reuse its memory
                meta = AttentionMetadata(
                    slot_mapping=self.slot_mapping[:b],
                    query_start_loc=list(range(b + 1)),
                    seq_lens=[1] * b,
                    block_tables=self.block_tables[:b],
                    block_size=bs,
                    backend_data=backend.decode_graph_data(
                        self.seq_lens[:b], self.block_tables[:b]
                    ),
                )
                args = (self.input_ids[:b], self.positions[:b], kv_caches, meta)
                decode_logits(model, args)  # warm-up: compiles kernels outside the capture
                torch.cuda.synchronize(device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    logits, tokens = decode_logits(model, args)
                pool = graph.pool()
                self.graphs[b] = (graph, logits, tokens)
        log.info("captured decode CUDA graphs for %s rows", sizes)

    def size_for(self, num_rows: int) -> int | None:
        """The bucket that replays a step of `num_rows` decode rows, or None when it must run
        eagerly (more rows than the largest bucket)."""
        if num_rows > self.sizes[-1]:
            return None
        return next(b for b in self.sizes if b >= num_rows)

    def replay(self, size, input_ids, positions, meta: AttentionMetadata):
        """Inputs padded to `size` rows (`DecodeRows.unpack`); returns the real rows' logits
        and argmax token ids, views into the graph's outputs that the next replay of this bucket
        overwrites."""
        width = meta.block_tables.shape[1]
        self.input_ids[:size].copy_(input_ids, non_blocking=True)
        self.positions[:size].copy_(positions, non_blocking=True)
        self.slot_mapping[:size].copy_(meta.slot_mapping, non_blocking=True)
        self.seq_lens[:size].copy_(meta.backend_data, non_blocking=True)
        # Columns past `width` keep stale ids; the kernel reads only the first
        # ceil(seq_len / block_size) of each row.
        self.block_tables[:size, :width].copy_(meta.block_tables, non_blocking=True)
        graph, logits, tokens = self.graphs[size]
        graph.replay()
        return logits[: meta.num_seqs], tokens[: meta.num_seqs]


def decode_logits(model, args) -> tuple[torch.Tensor, torch.Tensor]:
    """What a graph runs: the forward pass, the head and the argmax, [rows, vocab] and [rows]."""
    logits = model.compute_logits(model(*args))
    return logits, logits.argmax(dim=-1)


def run_decode_rows(
    model, backend, kv_caches, graphs: DecodeGraphs | None, size: int | None, ids, positions, meta
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, argmax) of every real row of a decode-rows step (`DecodeRows.unpack`'s inputs):
    a replay of the graph bucket `size`, or with `size` None the same computation eagerly."""
    if size is not None:
        return graphs.replay(size, ids, positions, meta)
    backend.prepare(meta)
    return decode_logits(model, (ids, positions, kv_caches, meta))
