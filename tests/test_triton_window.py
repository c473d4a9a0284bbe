"""The Triton kernels with a rolling KV buffer: table slots before the window hold a placeholder
block (kv_cache/window.py) that must never be read, and per-layer windows pick each layer's own.

As in test_triton_attention: under Triton's interpreter on CPU in the default suite, compiled on
a GPU with `pytest -m gpu`. The placeholder block is NaN: one read of it shows in the output.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined
pytest.importorskip("triton", minversion=None if torch.cuda.is_available() else "3.9")

from engine.attention.backend import AttentionMetadata, AttentionSpec  # noqa: E402
from engine.attention.torch_backend import TorchAttentionBackend  # noqa: E402
from engine.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from tests.test_triton_attention import DEVICES, make_step, rel_err, tolerance  # noqa: E402

WINDOW, BLOCK = 24, 16
# (cached, new): decodes, chunks continuing past the window, a fresh prompt longer than it.
STEPS = [(70, 1), (100, 1), (40, 9), (50, 30), (0, 40)]


def run(layer_windows, layer, dtype, device, seed=0):
    """Triton and torch outputs for one layer, with freed slots pointing at a NaN block."""
    gen = torch.Generator().manual_seed(seed)
    heads, kv_heads, head_dim = 8, 2, 64
    window = layer_windows[layer]
    spec = AttentionSpec(heads, kv_heads, head_dim, head_dim**-0.5, layer_windows=layer_windows)
    cache, meta = make_step(STEPS, BLOCK, kv_heads, head_dim, dtype, "cpu", gen)
    tables = meta.block_tables
    null = sorted(set(range(cache.shape[1])) - set(tables.flatten().tolist()))[0]
    if window is not None:
        for i, (cached, _) in enumerate(STEPS):
            tables[i, : max(cached - window + 1, 0) // BLOCK] = null  # freed by the scheduler
    num_tokens = meta.query_start_loc[-1]
    q = torch.randn((num_tokens, heads, head_dim), generator=gen).to(dtype)
    k = torch.randn((num_tokens, kv_heads, head_dim), generator=gen).to(dtype)
    v = torch.randn((num_tokens, kv_heads, head_dim), generator=gen).to(dtype)

    ref_meta = AttentionMetadata(
        meta.slot_mapping, meta.query_start_loc, meta.seq_lens, tables.clone(), BLOCK
    )
    ref_backend = TorchAttentionBackend(spec)
    ref_backend.prepare(ref_meta)
    # The reference masks after reading (0 * NaN = NaN): give it zeros.
    ref = ref_backend.forward(
        q.float(), k.float(), v.float(), cache.float().nan_to_num(0.0), ref_meta, layer
    )
    meta = AttentionMetadata(
        meta.slot_mapping.to(device),
        meta.query_start_loc,
        meta.seq_lens,
        tables.to(device),
        BLOCK,
    )
    backend = TritonAttentionBackend(spec, max_model_len=4096)
    backend.prepare(meta)
    out = backend.forward(q.to(device), k.to(device), v.to(device), cache.to(device), meta, layer)
    return out.float().cpu(), ref


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layer", [0, 1])
def test_freed_slots_never_read_and_per_layer_windows(device, layer):
    """Layer 0 slides (its freed slots hold the NaN block), layer 1 is global."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    out, ref = run((WINDOW, None), layer, dtype, device)
    assert not out.isnan().any()
    assert rel_err(out, ref) < tolerance(dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_window_layers_differ_from_global(device):
    """The window really applies per layer: the two layers' outputs differ on the same step."""
    local, _ = run((WINDOW, None), 0, torch.float32, device, seed=1)
    glob, _ = run((WINDOW, None), 1, torch.float32, device, seed=1)
    assert rel_err(local, glob) > 1e-2


@pytest.mark.parametrize("device", DEVICES)
def test_cla_layer_reads_fresh_prompts_from_the_cache(device):
    """A cross-layer-sharing layer gets no K/V of its own (key None): for prompts with nothing
    cached it must read what its group's first layer wrote this step, and equal that layer."""
    gen = torch.Generator().manual_seed(3)
    heads, kv_heads, head_dim = 8, 2, 64
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    spec = AttentionSpec(heads, kv_heads, head_dim, head_dim**-0.5)
    cache, meta = make_step(
        [(0, 40), (20, 5), (60, 1)], BLOCK, kv_heads, head_dim, dtype, "cpu", gen
    )
    num_tokens = meta.query_start_loc[-1]
    q = torch.randn((num_tokens, heads, head_dim), generator=gen).to(dtype).to(device)
    k = torch.randn((num_tokens, kv_heads, head_dim), generator=gen).to(dtype).to(device)
    v = torch.randn((num_tokens, kv_heads, head_dim), generator=gen).to(dtype).to(device)
    meta = AttentionMetadata(
        meta.slot_mapping.to(device),
        meta.query_start_loc,
        meta.seq_lens,
        meta.block_tables.to(device),
        BLOCK,
    )
    backend = TritonAttentionBackend(spec, max_model_len=4096)
    backend.prepare(meta)
    cache = cache.to(device)
    writer = backend.forward(q, k, v, cache, meta)  # writes this step's K/V
    reader = backend.forward(q, None, None, cache, meta)
    assert rel_err(reader.float().cpu(), writer.float().cpu()) < tolerance(dtype)
