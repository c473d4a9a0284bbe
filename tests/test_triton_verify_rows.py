"""A verify step's rows through the attention backends, against attention written out per row.

Speculative verification runs a request's d drafts as d + 1 one-token decode rows of the same
sequence (`engine.decode_graphs.DecodeRows`): consecutive positions, each row attending over its
own context, after every row's K/V is written, so row j sees rows 0..j. With attention sinks
each row's table is compact for its own context (the sink blocks, then its window), so rows of
one request read different tables. The Triton kernels run under the interpreter on CPU (compiled
with `pytest -m gpu`), the torch backends on CPU; the cache is poisoned outside the live blocks
and the slots never written (NaN for the kernels, which never load them; a large finite value
for the torch backends, which mask after gathering whole blocks).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined
pytest.importorskip("triton", minversion=None if torch.cuda.is_available() else "3.9")

from engine.attention.backend import AttentionSpec  # noqa: E402
from engine.attention.sink_backend import SinkAttentionBackend  # noqa: E402
from engine.attention.torch_backend import TorchAttentionBackend  # noqa: E402
from engine.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from engine.attention.triton_sink_backend import TritonSinkAttentionBackend  # noqa: E402
from engine.decode_graphs import DecodeRows  # noqa: E402
from engine.models.llama import rope_inv_freq  # noqa: E402
from tests.test_triton_attention import DEVICES, rel_err, tolerance  # noqa: E402
from tests.test_triton_sinks import reference_decode  # noqa: E402

SINKS, WINDOW, BLOCK, HEADS, KV_HEADS, HEAD_DIM = 2, 12, 4, 4, 2, 16
# Rows at positions 29..33 (contexts 30..34): their windows start in blocks 4 and 5.
FIRST, NUM_ROWS = 29, 5


def backend_for(name: str):
    inv_freq = rope_inv_freq(HEAD_DIM, 10000.0, None)
    sinks = AttentionSpec(HEADS, KV_HEADS, HEAD_DIM, HEAD_DIM**-0.5)
    window = AttentionSpec(HEADS, KV_HEADS, HEAD_DIM, HEAD_DIM**-0.5, sliding_window=WINDOW)
    return {
        "triton-sinks": lambda: TritonSinkAttentionBackend(sinks, inv_freq, SINKS, WINDOW, BLOCK),
        "torch-sinks": lambda: SinkAttentionBackend(sinks, inv_freq, SINKS, WINDOW),
        "triton-window": lambda: TritonAttentionBackend(window, max_model_len=64),
        "torch-window": lambda: TorchAttentionBackend(window),
    }[name]()


def reference_row(name, q, keys, values, context):
    """One row, written out: q [H, D]; keys/values [context, Hkv, D] by position."""
    if name.endswith("sinks"):
        inv_freq = rope_inv_freq(HEAD_DIM, 10000.0, None)
        return reference_decode(q, keys, values, context, SINKS, WINDOW, inv_freq)
    kept = list(range(max(context - WINDOW, 0), context))
    k = keys[kept].repeat_interleave(HEADS // KV_HEADS, dim=1)
    v = values[kept].repeat_interleave(HEADS // KV_HEADS, dim=1)
    scores = torch.einsum("hd,lhd->hl", q, k) * HEAD_DIM**-0.5
    return torch.einsum("hl,lhd->hd", scores.softmax(-1), v)


CASES = [("triton-sinks", d) for d in DEVICES] + [("triton-window", d) for d in DEVICES]
CASES += [("torch-sinks", "cpu"), ("torch-window", "cpu")]


@pytest.mark.parametrize("name,device", CASES)
def test_verify_rows_attend_over_their_own_context(name, device):
    backend = backend_for(name)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    gen = torch.Generator().manual_seed(3)
    total = FIRST + NUM_ROWS
    num_blocks = -(-total // BLOCK)
    # Block 0 stands for freed table slots (NULL_BLOCK_ID); the scratch block is the last.
    block_ids = (torch.randperm(num_blocks, generator=gen) + 1).tolist()
    scratch = num_blocks + 1
    # Blocks before the first row's window went back to the pool (KVWindow); sinks keep theirs.
    num_sink_blocks = -(-SINKS // BLOCK) if name.endswith("sinks") else 0
    first_live = (FIRST - WINDOW + 1) // BLOCK
    live = [i < num_sink_blocks or i >= first_live for i in range(num_blocks)]
    block_ids = [b if keep else 0 for b, keep in zip(block_ids, live)]
    keys, values = torch.randn((2, total, KV_HEADS, HEAD_DIM), generator=gen).to(dtype).float()
    poison = float("nan") if name.startswith("triton") else 100.0
    cache = torch.full((2, scratch + 1, BLOCK, KV_HEADS, HEAD_DIM), poison)
    for pos in range(FIRST):  # the context already cached; the rows write the rest
        if block_ids[pos // BLOCK]:
            cache[:, block_ids[pos // BLOCK], pos % BLOCK] = torch.stack([keys[pos], values[pos]])
    rows = DecodeRows(BLOCK, backend)
    rows.add(list(range(NUM_ROWS)), FIRST, block_ids)
    if name == "triton-sinks":  # compact tables: the rows' windows start in different blocks
        assert len({t[num_sink_blocks] for t in rows.tables}) == 2
        assert max(map(len, rows.tables)) <= backend.table_width  # a graph's tables hold them
    _, _, meta = rows.unpack(torch.tensor(rows.flat(NUM_ROWS, scratch)).to(device))
    assert meta.seq_lens == list(range(FIRST + 1, total + 1))
    q = torch.randn((NUM_ROWS, HEADS, HEAD_DIM), generator=gen).to(dtype).float()
    new = slice(FIRST, total)
    backend.prepare(meta)
    out = backend.forward(
        *(t.to(dtype).to(device) for t in (q, keys[new], values[new])),
        cache.to(dtype).to(device),
        meta,
    )
    out = out.float().cpu()
    ref = torch.stack(
        [reference_row(name, q[j], keys, values, FIRST + j + 1) for j in range(NUM_ROWS)]
    )
    assert not out.isnan().any()
    assert rel_err(out, ref) < tolerance(dtype)
