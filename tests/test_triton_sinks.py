"""The attention-sink decode kernel and TritonSinkAttentionBackend against float32 references.

As in test_triton_attention: under Triton's interpreter on CPU in the default suite, compiled on
a GPU with `pytest -m gpu`. Every case draws fresh random K/V, places blocks at random in the
pool, points freed table slots at a NaN block and fills never-written slots with NaN: one read
of anything outside the sinks and the window shows in the output.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined
pytest.importorskip("triton", minversion=None if torch.cuda.is_available() else "3.9")

from engine.attention.backend import AttentionMetadata, AttentionSpec  # noqa: E402
from engine.attention.sink_backend import SinkAttentionBackend  # noqa: E402
from engine.attention.triton_sink_backend import TritonSinkAttentionBackend  # noqa: E402
from engine.attention.triton_sink_kernels import paged_sink_decode, sink_rope_table  # noqa: E402
from engine.kv_cache import quant  # noqa: E402
from engine.models.llama import rope_inv_freq  # noqa: E402
from tests.helpers import random_prompts  # noqa: E402
from tests.test_attention_sinks import (  # noqa: E402
    SINKS,
    WINDOW,
    StreamingReference,
    greedy,
    sink_llm,
)
from tests.test_sliding_window import run_checked  # noqa: E402
from tests.test_triton_attention import CUDA, DEVICES, rel_err, tolerance  # noqa: E402

LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """RoPE, rotate-half convention, in float32: x [L, heads, D], positions [L]."""
    angles = positions.double()[:, None] * inv_freq.double()
    cos, sin = angles.cos().float()[:, None], angles.sin().float()[:, None]
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def reference_decode(q, keys, values, seq_len, sinks, window, inv_freq):
    """One decode, written out: q [H, D]; keys/values [seq_len, Hkv, D] by text position."""
    kept = [j for j in range(seq_len) if j < sinks or j >= seq_len - window]
    cache_pos = torch.arange(len(kept))
    k = rotate(keys[kept], cache_pos, inv_freq)
    q = rotate(q[None], cache_pos[-1:], inv_freq)[0]
    group = q.shape[0] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = values[kept].repeat_interleave(group, dim=1)
    scores = torch.einsum("hd,lhd->hl", q, k) * q.shape[-1] ** -0.5
    return torch.einsum("hl,lhd->hd", scores.softmax(-1), v)


class Pool:
    """A NaN-filled paged cache; sequences' live blocks at random places, freed slots NaN."""

    def __init__(self, seq_lens, sinks, window, block_size, kv_heads, head_dim, gen):
        self.block_size = block_size
        num_blocks = sum(-(-n // block_size) for n in seq_lens) + 2
        self.cache = torch.full((2, num_blocks, block_size, kv_heads, head_dim), float("nan"))
        perm = torch.randperm(num_blocks - 1, generator=gen) + 1
        self.null = 0  # what freed table slots point at (NULL_BLOCK_ID): NaN, never written
        self.tables, self.kv, start = [], [], 0
        for n in seq_lens:
            nb = -(-n // block_size)
            ids = perm[start : start + nb].tolist()
            start += nb
            num_sink_blocks = -(-sinks // block_size)
            first_live = max(n - window, 0) // block_size  # as KVWindow frees them
            ids = [b if i < num_sink_blocks or i >= first_live else self.null
                   for i, b in enumerate(ids)]  # fmt: skip
            kv = torch.randn((2, n, kv_heads, head_dim), generator=gen)
            for j in range(n):
                if ids[j // block_size] != self.null:
                    self.cache[:, ids[j // block_size], j % block_size] = kv[:, j]
            self.tables.append(ids)
            self.kv.append(kv)

    def round_to(self, dtype: torch.dtype) -> None:
        """Round every value to `dtype` (kept in float32): the reference then sees what the
        kernel reads."""
        self.cache = self.cache.to(dtype).float()
        self.kv = [kv.to(dtype).float() for kv in self.kv]


CASES = [  # (sinks, window, block_size, heads, kv_heads, head_dim, seq_lens)
    (4, 24, 16, 4, 1, 32, [1, 3, 4, 5, 28, 29, 100]),  # sinks < block < window, group 4
    (20, 8, 4, 4, 2, 16, [7, 19, 20, 21, 27, 28, 29, 75]),  # sinks span blocks, window small
    (1, 5, 8, 2, 2, 16, [2, 6, 7, 9, 33, 64]),  # window inside a block; sink mid-block
    (3, 70, 16, 8, 2, 16, [40, 73, 74, 200]),  # window over several blocks and tiles (> 64)
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_kernel_matches_explicit_reference(device, case, num_splits):
    sinks, window, block_size, heads, kv_heads, head_dim, lens = case
    gen = torch.Generator().manual_seed(sum(lens) + num_splits)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    pool = Pool(lens, sinks, window, block_size, kv_heads, head_dim, gen)
    pool.round_to(dtype)
    inv_freq = rope_inv_freq(head_dim, 10000.0, None)
    spec = AttentionSpec(heads, kv_heads, head_dim, head_dim**-0.5)
    backend = TritonSinkAttentionBackend(spec, inv_freq, sinks, window, block_size)
    rows = [backend.decode_block_ids(ids, n) for ids, n in zip(pool.tables, lens)]
    assert max(map(len, rows)) <= backend.table_width
    tables = torch.zeros((len(lens), backend.table_width), dtype=torch.int64)
    for i, row in enumerate(rows):
        tables[i, : len(row)] = torch.tensor(row)
    q = torch.randn((len(lens), heads, head_dim), generator=gen).to(dtype).float()
    out = torch.full_like(q, float("nan")).to(dtype).to(device)
    rope = sink_rope_table(inv_freq, sinks + window, dtype, torch.device(device))
    paged_sink_decode(
        q.to(dtype).to(device), pool.cache.to(dtype).to(device), tables.to(device),
        torch.tensor(lens, dtype=torch.int32, device=device), out, head_dim**-0.5,
        num_splits, rope, sinks, window,
    )  # fmt: skip
    ref = torch.stack(
        [reference_decode(q[i], *pool.kv[i], n, sinks, window, inv_freq)
         for i, n in enumerate(lens)]
    )  # fmt: skip
    out = out.float().cpu()
    assert not out.isnan().any()
    assert rel_err(out, ref) < tolerance(dtype)


def mixed_step(gen, sinks, window, block_size, kv_heads, head_dim, steps):
    """A step of decodes and prefill chunks, [(cached, new)], the way the engine packs it after
    the scheduler freed out-of-window blocks (logical tables, NaN where freed)."""
    lens = [c + n for c, n in steps]
    pool = Pool(lens, sinks, window, block_size, kv_heads, head_dim, gen)
    width = max(map(len, pool.tables))
    tables = torch.tensor([ids + [0] * (width - len(ids)) for ids in pool.tables])
    slots, query_start_loc, new_kv = [], [0], []
    for (cached, new), ids, kv in zip(steps, pool.tables, pool.kv):
        pos = torch.arange(cached, cached + new)
        slots.append(torch.tensor(ids)[pos // block_size] * block_size + pos % block_size)
        query_start_loc.append(query_start_loc[-1] + new)
        new_kv.append(kv[:, cached:])
    k, v = torch.cat(new_kv, dim=1)
    meta = AttentionMetadata(torch.cat(slots), query_start_loc, lens, tables, block_size)
    return pool, meta, k, v


def quantized(cache: torch.Tensor, kind: str, poison: float) -> torch.Tensor:
    """An 8-bit copy of a float32 pool: its written slots quantized, the others `poison`."""
    _, num_blocks, block_size, heads, head_dim = cache.shape
    shape = (2, num_blocks, block_size, heads, quant.cache_row_size(kind, head_dim))
    out = torch.zeros(shape, dtype=quant.cache_dtype(kind, torch.float32))
    flat = cache.view(2, -1, heads, head_dim)
    for half in (0, 1):
        quant.write(out[half], torch.arange(flat.shape[1]), flat[half].nan_to_num(poison), kind)
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
def test_backend_matches_torch_sink_backend(device, kv_cache_dtype):
    """Decodes (Triton) and prefill chunks (PyTorch) of one step, GQA, llama3 rope scaling,
    decodes not packed first: the same outputs and cache as SinkAttentionBackend."""
    sinks, window, block_size, heads, kv_heads, head_dim = 4, 20, 8, 4, 2, 16
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    gen = torch.Generator().manual_seed(7)
    steps = [(30, 6), (44, 1), (2, 1), (0, 13), (90, 1)]
    pool, meta, k, v = mixed_step(gen, sinks, window, block_size, kv_heads, head_dim, steps)
    pool.round_to(dtype)
    q = torch.randn((meta.query_start_loc[-1], heads, head_dim), generator=gen)
    q, k, v = (t.to(dtype).float() for t in (q, k, v))
    inv_freq = rope_inv_freq(head_dim, 500000.0, LLAMA3_SCALING)
    spec = AttentionSpec(heads, kv_heads, head_dim, head_dim**-0.5, kv_cache_dtype=kv_cache_dtype)
    # NOTE: finite poison: PyTorch's chunks (both backends) mask scores after reading whole
    # blocks, and 0 * NaN is NaN. A read of it by the kernel still shows (its tests use NaN).
    if kv_cache_dtype == "auto":
        cache = pool.cache.nan_to_num(100.0)
    else:
        cache = quantized(pool.cache, kv_cache_dtype, 100.0)
    ref_backend = SinkAttentionBackend(spec, inv_freq, sinks, window)
    ref_backend.prepare(meta)
    ref = ref_backend.forward(q, k, v, cache.clone(), meta)

    dev_meta = AttentionMetadata(
        meta.slot_mapping.to(device), meta.query_start_loc, meta.seq_lens,
        meta.block_tables.to(device), block_size,
    )  # fmt: skip
    backend = TritonSinkAttentionBackend(spec, inv_freq, sinks, window, block_size)
    backend.prepare(dev_meta)
    dev_cache = (cache if kv_cache_dtype != "auto" else cache.to(dtype)).to(device)
    out = backend.forward(*(t.to(dtype).to(device) for t in (q, k, v)), dev_cache, dev_meta)
    out = out.float().cpu()
    assert not out.isnan().any()
    assert rel_err(out, ref) < tolerance(dtype) * (1 if kv_cache_dtype == "auto" else 4)


@pytest.mark.parametrize("device", DEVICES)
def test_packed_decode_rows(device):
    """A pure-decode step as ModelRunner._prepare_decodes packs it (rows from decode_block_ids,
    decode_rows_packed) gives what the logical tables give."""
    sinks, window, block_size, heads, kv_heads, head_dim = 2, 12, 4, 4, 1, 16
    gen = torch.Generator().manual_seed(8)
    steps = [(56, 1), (9, 1), (13, 1)]
    pool, meta, k, v = mixed_step(gen, sinks, window, block_size, kv_heads, head_dim, steps)
    q = torch.randn((len(steps), heads, head_dim), generator=gen)
    inv_freq = rope_inv_freq(head_dim, 10000.0, None)
    spec = AttentionSpec(heads, kv_heads, head_dim, head_dim**-0.5)
    backend = TritonSinkAttentionBackend(spec, inv_freq, sinks, window, block_size)
    rows = [backend.decode_block_ids(ids, n) for ids, n in zip(pool.tables, meta.seq_lens)]
    packed = torch.tensor([r + [0] * (backend.table_width - len(r)) for r in rows])
    outs = []
    for tables, is_packed in ((meta.block_tables, False), (packed, True)):
        step = AttentionMetadata(
            meta.slot_mapping.to(device), meta.query_start_loc, meta.seq_lens,
            tables.to(device), block_size, decode_rows_packed=is_packed,
        )  # fmt: skip
        backend.prepare(step)
        cache = pool.cache.clone().to(device)
        outs.append(backend.forward(q.to(device), k.to(device), v.to(device), cache, step).cpu())
    assert not outs[0].isnan().any()
    assert rel_err(outs[1], outs[0]) < 1e-6


def with_triton_sinks(llm):
    """Swap the engine's SinkAttentionBackend for the Triton one (on CPU: the interpreter; the
    model then runs its unfused path, which rotates nothing for either)."""
    runner = llm.engine.runner
    old = runner.backend
    assert isinstance(old, SinkAttentionBackend)
    new = TritonSinkAttentionBackend(
        old.spec, old.inv_freq, old.num_sink_tokens, old.window, runner.block_size
    )
    runner.backend = new
    for layer in runner.model.model.layers:
        layer.self_attn._backend = new
    return llm


@pytest.mark.skipif(CUDA, reason="the GPU runs this in test_attention_sinks, compiled")
def test_engine_with_triton_sinks_matches_reference(model_dir):
    """The whole engine on the Triton sink backend, chunked prefill beside decodes, decoding past
    max_model_len: the streaming reference's tokens, blocks bounded."""
    prompts = random_prompts([40, 7], seed=6)
    llm = with_triton_sinks(sink_llm(model_dir, max_model_len=64, max_num_batched_tokens=8))
    outputs = run_checked(llm, prompts, greedy(36))
    streaming = StreamingReference(model_dir, SINKS, WINDOW)
    for prompt, out in zip(prompts, outputs):
        assert out.token_ids == streaming.greedy(prompt, 36)
