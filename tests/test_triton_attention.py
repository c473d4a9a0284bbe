"""The Triton attention kernels equal the torch backend (the float32 reference).

Without a GPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set below before
the kernels are defined) on CPU tensors, in the default suite; on a GPU machine the same cases
run compiled, in bf16 too, with `pytest -m gpu`.

Every case draws fresh random inputs, lays each sequence's pages out at random places in the
pool, and fills the rest of the cache with NaN: a read of a slot that was never written, or an
output row never written, shows up as NaN.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Before 3.9 the interpreter's loops over run-time bounds fail with NumPy >= 2.4 (int() of a
# 1-element array); compiled kernels on a GPU are fine with older Triton.
pytest.importorskip("triton", minversion=None if torch.cuda.is_available() else "3.9")

from engine.attention import triton_kernels as tk  # noqa: E402
from engine.attention.backend import AttentionMetadata, AttentionSpec  # noqa: E402
from engine.attention.torch_backend import TorchAttentionBackend  # noqa: E402
from engine.attention.triton_backend import TritonAttentionBackend  # noqa: E402

CUDA = torch.cuda.is_available()
# On CPU the interpreter is slow: a few shapes cover the cases; the GPU runs the full grid.
DEVICES = [pytest.param("cuda", marks=pytest.mark.gpu)] if CUDA else ["cpu"]


def make_step(steps, block_size, num_kv_heads, head_dim, dtype, device, gen, extra_blocks=3):
    """steps: [(num_cached, num_new), ...] per sequence. Returns the cache (NaN except the cached
    prefixes, which hold random K/V) and the metadata the model runner would build."""
    blocks_per_seq = [-(-(c + n) // block_size) for c, n in steps]
    num_blocks = sum(blocks_per_seq) + extra_blocks
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    cache = torch.full(
        (2, num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype
    )
    width = max(blocks_per_seq)
    tables = torch.zeros((len(steps), width), dtype=torch.int64)
    slots, query_start_loc, seq_lens = [], [0], []
    for i, ((cached, new), nb) in enumerate(zip(steps, blocks_per_seq)):
        ids = torch.tensor(perm[:nb])
        perm = perm[nb:]
        tables[i, :nb] = ids
        pos = torch.arange(cached + new)
        seq_slots = ids[pos // block_size] * block_size + pos % block_size
        flat = cache.view(2, -1, num_kv_heads, head_dim)
        flat[:, seq_slots[:cached]] = torch.randn(
            (2, cached, num_kv_heads, head_dim), generator=gen
        ).to(dtype)
        slots.append(seq_slots[cached:])
        query_start_loc.append(query_start_loc[-1] + new)
        seq_lens.append(cached + new)
    meta = AttentionMetadata(
        slot_mapping=torch.cat(slots).to(device),
        query_start_loc=query_start_loc,
        seq_lens=seq_lens,
        block_tables=tables.to(device),
        block_size=block_size,
    )
    return cache.to(device), meta


def run_both(steps, heads, kv_heads, head_dim, dtype, device, block_size=16, window=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    spec = AttentionSpec(heads, kv_heads, head_dim, head_dim**-0.5, window)
    cache, meta = make_step(steps, block_size, kv_heads, head_dim, dtype, device, gen)
    num_tokens = meta.query_start_loc[-1]
    q = torch.randn((num_tokens, heads, head_dim), generator=gen).to(dtype).to(device)
    k = torch.randn((num_tokens, kv_heads, head_dim), generator=gen).to(dtype).to(device)
    v = torch.randn((num_tokens, kv_heads, head_dim), generator=gen).to(dtype).to(device)

    ref_backend = TorchAttentionBackend(spec)
    # The reference gathers whole blocks and masks afterwards (0 * NaN = NaN): give it zeros.
    ref_cache = cache.float().cpu().nan_to_num(0.0)
    ref_meta = AttentionMetadata(
        meta.slot_mapping.cpu(),
        meta.query_start_loc,
        meta.seq_lens,
        meta.block_tables.cpu(),
        block_size,
    )
    ref_backend.prepare(ref_meta)
    q32, k32, v32 = q.float().cpu(), k.float().cpu(), v.float().cpu()
    ref = ref_backend.forward(q32, k32, v32, ref_cache, ref_meta)

    # Only this step's slots were written: the rest of the NaN poison is still there.
    expected_nan = cache.isnan().cpu()
    expected_nan.view(2, -1, kv_heads, head_dim)[:, meta.slot_mapping.cpu()] = False
    backend = TritonAttentionBackend(spec, max_model_len=4096)
    backend.prepare(meta)
    out = backend.forward(q, k, v, cache, meta)
    cache = cache.float().cpu()
    assert torch.equal(cache.isnan(), expected_nan)
    written = ~expected_nan
    assert torch.allclose(cache[written], ref_cache[written], rtol=0, atol=1e-6)
    return out.float().cpu(), ref


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


def tolerance(dtype):
    return {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]


# -- decode ------------------------------------------------------------------------------------

DECODE_CASES = [  # (heads, kv_heads, head_dim, context lengths)
    (4, 4, 64, [1, 16, 17, 77]),  # GQA ratio 1, block boundaries
    (8, 2, 128, [15, 64, 65, 130]),  # ratio 4, head_dim 128
    (8, 1, 64, [2, 33, 200]),  # ratio 8
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("heads,kv_heads,head_dim,lens", DECODE_CASES)
def test_decode_matches_reference(device, heads, kv_heads, head_dim, lens):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    steps = [(n - 1, 1) for n in lens]
    out, ref = run_both(steps, heads, kv_heads, head_dim, dtype, device)
    assert not out.isnan().any()
    assert rel_err(out, ref) < tolerance(dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_splits", [3, 16])
def test_decode_splits_agree(device, num_splits):
    """Split-K and its reduction give the unsplit answer, also when some splits are empty."""
    gen = torch.Generator().manual_seed(num_splits)
    lens = [1, 40, 300]
    heads, kv_heads, head_dim = 4, 1, 64
    dtype = torch.float32
    cache, meta = make_step([(n - 1, 1) for n in lens], 16, kv_heads, head_dim, dtype, "cpu", gen)
    flat = cache.view(2, -1, kv_heads, head_dim)
    flat[:, meta.slot_mapping] = torch.randn((2, len(lens), kv_heads, head_dim), generator=gen)
    q = torch.randn((len(lens), heads, head_dim), generator=gen)
    spec = AttentionSpec(heads, kv_heads, head_dim, head_dim**-0.5)
    ref_backend = TorchAttentionBackend(spec)
    ref_backend.prepare(meta)
    k, v = flat[0, meta.slot_mapping], flat[1, meta.slot_mapping]
    ref = ref_backend.forward(q, k, v, cache.nan_to_num(0.0), meta)
    cache, q = cache.to(device), q.to(device)
    out = torch.full_like(q, float("nan"))
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    tables = meta.block_tables.to(device)
    tk.paged_decode(q, cache, tables, seq_lens, out, head_dim**-0.5, num_splits)
    assert rel_err(out.cpu(), ref) < 1e-5


# -- prefill -----------------------------------------------------------------------------------

PREFILL_CASES = [  # (heads, kv_heads, head_dim, [(cached, new), ...])
    (4, 4, 64, [(16, 17), (5, 33), (0, 20)]),  # ratio 1; the last has no prefix (SDPA path)
    (8, 2, 128, [(31, 2), (64, 33)]),  # ratio 4, head_dim 128
    (8, 1, 64, [(100, 7), (1, 15), (3, 1)]),  # ratio 8, a decode in the same step
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("heads,kv_heads,head_dim,steps", PREFILL_CASES)
def test_prefill_over_cached_prefix(device, heads, kv_heads, head_dim, steps):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    out, ref = run_both(steps, heads, kv_heads, head_dim, dtype, device)
    assert not out.isnan().any()
    assert rel_err(out, ref) < tolerance(dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_sliding_window(device):
    """Mistral-style window: decode and continued prefill see only the last `window` keys."""
    steps = [(70, 1), (40, 9), (0, 30)]
    out, ref = run_both(steps, 4, 2, 64, torch.float32, device, window=24, seed=5)
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_other_block_size_and_half_precision(device):
    steps = [(7, 1), (40, 9), (0, 12)]
    out, ref = run_both(steps, 8, 2, 64, torch.float16, device, block_size=8, seed=7)
    assert rel_err(out, ref) < tolerance(torch.float16)


# -- GPU only: the full grid, compiled, bf16 ---------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_grid(dtype, group, head_dim):
    kv_heads = 8 // group if group < 8 else 1
    steps = [(n - 1, 1) for n in (1, 15, 16, 17, 255, 1000, 2049)]
    steps += [(16, 17), (0, 300), (129, 77), (1000, 512), (3, 1)]
    for seed in range(2):  # fresh inputs each time
        out, ref = run_both(steps, kv_heads * group, kv_heads, head_dim, dtype, "cuda", seed=seed)
        assert not out.isnan().any()
        assert rel_err(out, ref) < tolerance(dtype), (dtype, group, head_dim, seed)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_fresh_prefill_uses_flash():
    """Prefills with no cached prefix must be eligible for the flash kernel (else SDPA would fall
    back silently to a slower one): forcing flash must not raise."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out, ref = run_both([(0, 300), (0, 77)], 32, 8, 128, torch.bfloat16, "cuda")
    assert rel_err(out, ref) < tolerance(torch.bfloat16)
