"""The Triton kernels on an 8-bit KV cache equal the torch backend on the same cache: both write
the same quantized bytes and attend to the same dequantized K/V (decodes, chunks over a cached
prefix, and fresh prompts, which on an 8-bit cache also read their keys back from it).

On CPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set before they are
defined), as in test_triton_attention.py.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", minversion=None if torch.cuda.is_available() else "3.9")

from engine.attention.backend import AttentionMetadata, AttentionSpec  # noqa: E402
from engine.attention.torch_backend import TorchAttentionBackend  # noqa: E402
from engine.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from engine.kv_cache import quant  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BLOCK_SIZE = 16


def quantized_step(kind, steps, kv_heads, head_dim, gen):
    """steps: [(num_cached, num_new)] per sequence. A zeroed 8-bit cache whose cached prefixes
    hold quantized random K/V at randomly placed pages, and the step's metadata."""
    blocks_per_seq = [-(-(c + n) // BLOCK_SIZE) for c, n in steps]
    num_blocks = sum(blocks_per_seq) + 2
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    row = quant.cache_row_size(kind, head_dim)
    cache = torch.zeros(
        (2, num_blocks, BLOCK_SIZE, kv_heads, row), dtype=quant.cache_dtype(kind, torch.float32)
    )
    tables = torch.zeros((len(steps), max(blocks_per_seq)), dtype=torch.int64)
    slots, query_start_loc, seq_lens = [], [0], []
    for i, ((cached, new), nb) in enumerate(zip(steps, blocks_per_seq)):
        ids = torch.tensor(perm[:nb])
        perm = perm[nb:]
        tables[i, :nb] = ids
        pos = torch.arange(cached + new)
        seq_slots = ids[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE
        for half in range(2):
            prefix = torch.randn((cached, kv_heads, head_dim), generator=gen)
            quant.write(cache[half], seq_slots[:cached], prefix, kind)
        slots.append(seq_slots[cached:])
        query_start_loc.append(query_start_loc[-1] + new)
        seq_lens.append(cached + new)
    meta = AttentionMetadata(
        slot_mapping=torch.cat(slots).to(DEVICE),
        query_start_loc=query_start_loc,
        seq_lens=seq_lens,
        block_tables=tables.to(DEVICE),
        block_size=BLOCK_SIZE,
    )
    return cache.to(DEVICE), meta


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_triton_matches_torch_on_8bit_cache(kind):
    heads, kv_heads, head_dim = 4, 2, 32
    gen = torch.Generator().manual_seed(0)
    # Two decodes, a chunk over a cached prefix, a fresh prompt.
    steps = [(40, 1), (7, 1), (20, 13), (0, 21)]
    cache, meta = quantized_step(kind, steps, kv_heads, head_dim, gen)
    num_tokens = meta.query_start_loc[-1]
    q, k, v = (
        torch.randn((num_tokens, h, head_dim), generator=gen).to(DEVICE)
        for h in (heads, kv_heads, kv_heads)
    )
    spec = AttentionSpec(heads, kv_heads, head_dim, head_dim**-0.5, kv_cache_dtype=kind)
    outs, caches = [], []
    for backend in (TorchAttentionBackend(spec), TritonAttentionBackend(spec, 1024)):
        c = cache.clone()
        m = AttentionMetadata(**{**meta.__dict__, "backend_data": None})
        backend.prepare(m)
        outs.append(backend.forward(q, k, v, c, m))
        caches.append(c)
    assert torch.equal(caches[0], caches[1])  # the same quantized bytes were written
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)
