"""GPU attention: Triton kernels over the paged cache, PyTorch's flash SDPA for fresh prompts.

Per layer, `forward` does:

1. the KV write: a Triton kernel stores this step's K and V at `slot_mapping`;
2. decodes (query length 1): one paged-attention launch for all of them, split along the
   context (`triton_kernels.paged_decode`);
3. prefill chunks with nothing cached before them: causal attention on the chunk's own q/k/v,
   in place in the step's packed tensors: one varlen flash call per run of adjacent chunks
   (FA2 through `aten._flash_attention_forward`, GQA native) where CUDA can, else
   `F.scaled_dot_product_attention` with `is_causal`, one call each. NOTE: not SDPA on CUDA:
   PyTorch sends it to cuDNN, which builds an execution plan for every new sequence length,
   ~65 ms of host time with the GPU idle (Llama-3-8B shape, H200, 2026-11-26), in a serving step
   of ~50 ms; a server sees new prompt lengths all the time. cuDNN runs the pairs ~1.7x faster
   than FA2 once planned, which is ~1 ms of a 2048-token prompt's ~50 ms prefill;
4. prefill chunks that continue a cached prefix (prefix-cache hits, chunked prefill): either
   gathered out of their pages into contiguous K/V and passed to flash SDPA with a lower-right
   causal mask (`gathered_prefill.py`: one varlen call for all of them), or one Triton launch for
   all of them that reads the prefix pages in place from the block table
   (`triton_kernels.paged_prefill`). `sdpa_prefill_min_tokens` picks, per chunk.

Why both: the gather copies the chunk's whole context every layer (for the last 512-token chunk
of a 4k prompt that is 8x the chunk's own K/V), which `paged_prefill` never does; but flash runs
each (query, key) pair faster than our kernel, and a chunk's attention FLOPs grow with its length
while the copy does not. Per KV head, the copy moves 8 * head_dim bytes a context token (K and
V, read and written, bf16) and attention does 4 * head_dim * G * q_len FLOPs on it (G query heads
per KV head, at least q_len / 2 queries seeing each key); at an H100's ~350 TFLOP/s of flash and
~2.6 TB/s of copy, the copy costs at most 540 / (G * q_len) of flash's time (half at G * q_len =
1024, a 256-token chunk of Llama-3-8B; with a long prefix every key meets all q_len queries, and
it is a quarter). From there on the gather wins whenever `paged_prefill` is more than ~1.5x
slower than flash per pair; shorter chunks (few queries: a
short last chunk, a small prefix-cache miss) stay on the kernel. Measured on an H100 the kernel
is 1.2-1.4x slower than the gathered flash from 1024-token chunks and about even at 256, so the
default threshold (SDPA_PREFILL_MIN_ROWS) is G * q_len >= 2048; benchmarks/prefill_attention.py
measures both paths.

With a sliding window (per layer: `forward`'s `layer` picks it) every chunk over a prefix takes
the kernel, and neither kernel loads a key before the window: those blocks may be back in the
pool, their table slots a placeholder.

With an 8-bit KV cache (`spec.kv_cache_dtype`), K and V are quantized (kv_cache/quant.py) before
the write, the kernels (and the gather) dequantize as they read, and every prefill chunk goes
through (4) so it attends to its own keys quantized, as the torch backend does.

The torch backend stays the CPU path and the reference these kernels are tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.attention import triton_kernels as tk
from engine.attention.backend import AttentionBackend, AttentionMetadata, AttentionSpec
from engine.attention.gathered_prefill import (
    GatheredChunks,
    can_use_varlen,
    gather_chunks,
    gathered_attention,
    read_slots,
)
from engine.kv_cache import quant


@dataclass
class DecodeBatch:
    """The decodes of a step. In a CUDA graph these tensors are the graph's static buffers:
    the model runner rewrites them in place before each replay."""

    seq_lens: torch.Tensor  # [n] int32, context length including the new token
    block_tables: torch.Tensor  # [n, max_blocks]
    num_splits: int
    token_idx: torch.Tensor | None = None  # [n] rows in the flat batch; None: rows 0..n-1


@dataclass
class FreshRun:
    """Adjacent fresh chunks, rows [start, end) of the step: one varlen flash call."""

    start: int
    end: int
    cu_seqlens: torch.Tensor  # [n + 1] int32 offsets of the chunks within the run (device)
    max_len: int


def fresh_runs(fresh: list[tuple[int, int]], device: torch.device) -> list[FreshRun]:
    """Group fresh chunks (in row order) into runs of adjacent ones; one upload for all."""
    groups: list[list[tuple[int, int]]] = []
    for chunk in fresh:
        if groups and groups[-1][-1][1] == chunk[0]:
            groups[-1].append(chunk)
        else:
            groups.append([chunk])
    offsets = [[s - g[0][0] for s, _ in g] + [g[-1][1] - g[0][0]] for g in groups]
    dev = torch.tensor([o for run in offsets for o in run], dtype=torch.int32)
    dev = dev.to(device, non_blocking=True)
    runs, at = [], 0
    for group, run in zip(groups, offsets, strict=True):
        cu = dev[at : at + len(run)]
        at += len(run)
        runs.append(FreshRun(group[0][0], group[-1][1], cu, max(e - s for s, e in group)))
    return runs


@dataclass
class PagedChunks:
    """Prefill chunks for one `triton_kernels.paged_prefill` launch (device tensors)."""

    tile_seq: torch.Tensor
    tile_start: torch.Tensor
    q_start: torch.Tensor
    q_lens: torch.Tensor
    seq_lens: torch.Tensor
    table_row: torch.Tensor


@dataclass
class PrefillBatch:
    fresh: list[tuple[int, int]]  # (start, end) of chunks with no cached prefix
    # The fresh chunks as runs of adjacent ones, for varlen flash (CUDA): one call per run.
    fresh_runs: list[FreshRun] | None = None
    # Chunks over a cached prefix, in layers without a window: gather + SDPA, or the kernel.
    gathered: GatheredChunks | None = None
    paged: PagedChunks | None = None
    # All chunks over a cached prefix, in layers with a window (the kernel only).
    windowed: PagedChunks | None = None


def paged_chunks(meta: AttentionMetadata, seqs: list[int], block_q: int) -> PagedChunks | None:
    """The tiles of one paged_prefill launch over sequences `seqs` of the step (one upload)."""
    if not seqs:
        return None
    starts = torch.tensor([meta.query_start_loc[i] for i in seqs])
    lens = torch.tensor([meta.query_len(i) for i in seqs])
    tiles_per_seq = (lens + block_q - 1) // block_q
    tile_seq = torch.repeat_interleave(torch.arange(len(seqs)), tiles_per_seq)
    first_tile = torch.cumsum(tiles_per_seq, 0) - tiles_per_seq
    tile_start = (torch.arange(len(tile_seq)) - first_tile[tile_seq]) * block_q
    seq_lens = torch.tensor([meta.seq_lens[i] for i in seqs])
    host = torch.cat([tile_seq, tile_start, starts, lens, seq_lens, torch.tensor(seqs)])
    dev = host.to(torch.int32).to(meta.block_tables.device, non_blocking=True)
    t, c = len(tile_seq), len(seqs)
    parts = dev[2 * t :].view(4, c)
    return PagedChunks(dev[:t], dev[t : 2 * t], parts[0], parts[1], parts[2], parts[3])


# Score rows per KV head (query tokens x query heads of the group) from which a chunk over a
# cached prefix is gathered for SDPA by default. Measured on an H100 (Llama-3-8B attention,
# bf16, benchmarks/prefill_attention.py, 2026-11-26): paged_prefill / gathered varlen flash is
# 0.84-1.22 for 256-token chunks over a prefix (G = 4: 1024 rows), 1.01-1.34 at 512 tokens, 1.2-1.4
# from 1024 tokens; so from 2048 rows.
SDPA_PREFILL_MIN_ROWS = 2048


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # the Triton interpreter on CPU (tests): any value works


class TritonAttentionBackend(AttentionBackend):
    def __init__(self, spec: AttentionSpec, max_model_len: int):
        super().__init__(spec)
        self.max_model_len = max_model_len
        self._num_sms: int | None = None
        # Chunks over a cached prefix with at least this many query tokens are gathered and go
        # through SDPA; shorter ones through paged_prefill. 0: all gathered; None: none. The
        # default is SDPA_PREFILL_MIN_ROWS's rule (G * q_len >= 2048); benchmarks flip it.
        group = spec.num_heads // spec.num_kv_heads
        self.sdpa_prefill_min_tokens: int | None = max(1, SDPA_PREFILL_MIN_ROWS // group)
        # Gathered chunks: one varlen flash call when CUDA can (else one SDPA call each).
        self.sdpa_prefill_varlen = True
        # Fresh chunks: varlen flash when CUDA can; False: SDPA (cuDNN on CUDA; see the top).
        self.fresh_prefill_varlen = True

    def num_splits(self, num_decodes: int, device: torch.device) -> int:
        """Split count for a decode batch. It depends on the batch size and `max_model_len`
        only, not on this step's lengths, so a CUDA graph captured for a batch size is valid for
        any context that fits."""
        if self._num_sms is None:
            self._num_sms = _num_sms(device)
        return tk.decode_num_splits(
            num_decodes, self.spec.num_kv_heads, self.max_model_len, self._num_sms
        )

    def prepare(self, meta: AttentionMetadata) -> None:
        device = meta.slot_mapping.device
        q_lens = [meta.query_len(i) for i in range(meta.num_seqs)]
        decode_seqs = [i for i, n in enumerate(q_lens) if n == 1]
        prefill_seqs = [i for i, n in enumerate(q_lens) if n > 1]
        decodes = None
        if decode_seqs:
            n = len(decode_seqs)
            # The runner packs decodes first; then the decode rows are simply 0..n-1.
            contiguous = decode_seqs == list(range(n))
            rows = None if contiguous else [meta.query_start_loc[i] for i in decode_seqs]
            host = torch.tensor([meta.seq_lens[i] for i in decode_seqs] + (rows or []))
            dev = host.to(torch.int32).to(device, non_blocking=True)
            tables = meta.block_tables if contiguous else meta.block_tables[decode_seqs]
            decodes = DecodeBatch(
                seq_lens=dev[:n],
                block_tables=tables[:n] if contiguous else tables,
                num_splits=self.num_splits(n, device),
                token_idx=None if contiguous else dev[n:],
            )
        plain = self.spec.windows == (None,) and not quant.is_quantized(self.spec.kv_cache_dtype)
        fresh, cont = [], []
        for i in prefill_seqs:
            start, end = meta.query_start_loc[i], meta.query_start_loc[i + 1]
            if end - start == meta.seq_lens[i] and plain:
                fresh.append((start, end))
            else:
                cont.append(i)
        prefills = PrefillBatch(fresh)
        if fresh and device.type == "cuda" and self.fresh_prefill_varlen:
            prefills.fresh_runs = fresh_runs(fresh, device)
        if cont:
            block_q = tk.prefill_block_q(self.spec.num_heads, self.spec.num_kv_heads)
            threshold = self.sdpa_prefill_min_tokens
            gathered = [] if threshold is None or None not in self.spec.windows else cont
            gathered = [i for i in gathered if q_lens[i] >= threshold]
            if gathered:
                prefills.gathered = gather_chunks(meta, gathered)
            prefills.paged = paged_chunks(meta, [i for i in cont if i not in gathered], block_q)
            if any(w is not None for w in self.spec.windows):
                prefills.windowed = (
                    paged_chunks(meta, cont, block_q) if gathered else prefills.paged
                )
        meta.backend_data = (decodes, prefills)

    def forward(self, query, key, value, kv_cache, meta, layer=None, out=None):
        """Attention of `query`'s rows; into `out` (shaped like `query`) when given."""
        spec = self.spec
        window = spec.window_of(layer)
        if key is not None:  # None: a CLA layer reading the cache its group's first wrote
            self.write(key, value, kv_cache, meta.slot_mapping)
        decodes, prefills = meta.backend_data
        out = torch.empty_like(query) if out is None else out
        if decodes is not None:
            tk.paged_decode(
                query,
                kv_cache,
                decodes.block_tables,
                decodes.seq_lens,
                out,
                spec.scale,
                decodes.num_splits,
                decodes.token_idx,
                window,
            )
        if prefills is None:
            return out
        if key is None and prefills.fresh:
            # A CLA layer's fresh prompts: this step's K/V are in the cache (its group's first
            # layer wrote them); read them back by slot for the dense kernel.
            key, value = (
                read_slots(half, meta.slot_mapping, spec.kv_cache_dtype, query.dtype)
                for half in kv_cache
            )
        fresh = prefills.fresh
        if prefills.fresh_runs is not None and can_use_varlen(query):
            fresh = []
            for run in prefills.fresh_runs:
                rows = slice(run.start, run.end)
                # NOTE: a private op, as in gathered_prefill.py; `is_causal` per sequence.
                out[rows] = torch.ops.aten._flash_attention_forward(
                    query[rows], key[rows], value[rows], run.cu_seqlens, run.cu_seqlens,
                    run.max_len, run.max_len, 0.0, True, False, scale=spec.scale,
                )[0]  # fmt: skip
        for start, end in fresh:
            q = query[start:end].transpose(0, 1).unsqueeze(0)  # [1, H, L, D]
            k = key[start:end].transpose(0, 1).unsqueeze(0)
            v = value[start:end].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=spec.scale, enable_gqa=True
            )
            out[start:end] = o[0].transpose(0, 1)
        if window is None and prefills.gathered is not None:
            gathered_attention(
                query, kv_cache, prefills.gathered, out, spec.scale, spec.kv_cache_dtype,
                self.sdpa_prefill_varlen,
            )  # fmt: skip
        paged = prefills.paged if window is None else prefills.windowed
        if paged is not None:
            tk.paged_prefill(
                query,
                kv_cache,
                meta.block_tables,
                out,
                spec.scale,
                paged.tile_seq,
                paged.tile_start,
                paged.q_start,
                paged.q_lens,
                paged.seq_lens,
                paged.table_row,
                window,
            )
        return out

    def write(self, key, value, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """This step's K and V into the cache at `slot_mapping` (8-bit: quantized first)."""
        kind = self.spec.kv_cache_dtype
        if quant.is_quantized(kind):
            quant.write(kv_cache[0], slot_mapping, key, kind)
            quant.write(kv_cache[1], slot_mapping, value, kind)
        else:
            tk.write_kv(key, value, kv_cache, slot_mapping)

    def decode_graph_data(
        self, seq_lens: torch.Tensor, block_tables: torch.Tensor
    ) -> tuple[DecodeBatch, None]:
        """`backend_data` for a decode-only step whose inputs live in the static buffers of a
        CUDA graph (rows 0..n-1 are the decodes). Called by the model runner at capture."""
        n = seq_lens.shape[0]
        return DecodeBatch(seq_lens, block_tables, self.num_splits(n, seq_lens.device)), None
