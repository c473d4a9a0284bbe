"""Chunks over a cached prefix through gather + SDPA (engine/attention/gathered_prefill.py) give
`paged_prefill`'s and the torch backend's outputs, and the engine on them gives transformers'
greedy tokens.

On CPU the Triton kernels run under the interpreter (as in test_triton_attention.py) and the
gathered path takes one SDPA call per chunk; on a GPU (`pytest -m gpu`) the gpu-marked cases run
the varlen flash call in bf16 against a float32 reference.
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
from tests.test_triton_attention import make_step, rel_err, tolerance  # noqa: E402
from tests.test_triton_kv_quant import quantized_step  # noqa: E402

CUDA = torch.cuda.is_available()


def copy_meta(meta: AttentionMetadata, device="cpu") -> AttentionMetadata:
    return AttentionMetadata(
        meta.slot_mapping.to(device),
        meta.query_start_loc,
        meta.seq_lens,
        meta.block_tables.to(device),
        meta.block_size,
    )


def triton_out(spec, cache, meta, q, k, v, min_tokens, varlen=True, layer=None):
    backend = TritonAttentionBackend(spec, max_model_len=8192)
    backend.sdpa_prefill_min_tokens = min_tokens
    backend.sdpa_prefill_varlen = varlen
    m = copy_meta(meta, cache.device)
    backend.prepare(m)
    return backend.forward(q, k, v, cache.clone(), m, layer).float().cpu(), m.backend_data[1]


def reference_out(spec, cache, meta, q, k, v, layer=None):
    """The torch backend in float32 on CPU; it reads whole blocks, so NaN poison becomes 0."""
    backend = TorchAttentionBackend(spec)
    m = copy_meta(meta)
    backend.prepare(m)
    ref_cache = cache.cpu() if spec.kv_cache_dtype != "auto" else cache.float().cpu().nan_to_num()
    f32 = (x.float().cpu() for x in (q, k, v))
    return backend.forward(*f32, ref_cache, m, layer)


def make_case(steps, heads, kv_heads, head_dim, seed, kind="auto", dtype=torch.float32, **spec):
    """(spec, cache, meta, q, k, v) of a step: steps [(cached, new)] per sequence, the cached
    prefixes' pages scattered (a float cache poisoned with NaN elsewhere; 8-bit: quantized)."""
    gen = torch.Generator().manual_seed(seed)
    device = "cuda" if dtype != torch.float32 else "cpu"
    if kind == "auto":
        cache, meta = make_step(steps, 16, kv_heads, head_dim, dtype, device, gen)
    else:
        cache, meta = quantized_step(kind, steps, kv_heads, head_dim, gen)
    n = meta.query_start_loc[-1]
    q, k, v = (
        torch.randn((n, h, head_dim), generator=gen).to(dtype).to(cache.device)
        for h in (heads, kv_heads, kv_heads)
    )
    spec = AttentionSpec(heads, kv_heads, head_dim, head_dim**-0.5, kv_cache_dtype=kind, **spec)
    return spec, cache, meta, q, k, v


CASES = [  # (heads, kv_heads, head_dim, [(cached, new), ...])
    # GQA 4: prefixes at a block boundary (16, 64) and not (31, 5); a fresh prompt and a decode
    # between the chunks, so the gathered chunks' rows are not one range.
    (8, 2, 128, [(16, 17), (0, 20), (31, 2), (5, 1), (64, 33)]),
    (4, 4, 64, [(100, 7), (1, 15)]),  # MHA
    (8, 1, 64, [(3, 40), (47, 16)]),  # GQA 8
]


@pytest.mark.parametrize("heads,kv_heads,head_dim,steps", CASES)
def test_gathered_equals_paged_and_reference(heads, kv_heads, head_dim, steps):
    spec, cache, meta, q, k, v = make_case(steps, heads, kv_heads, head_dim, seed=head_dim)
    gathered, prefills = triton_out(spec, cache, meta, q, k, v, min_tokens=0)
    assert sum(n > 1 for _, n in steps if _ > 0) == len(prefills.gathered.kv_lens)
    assert prefills.paged is None
    paged, prefills = triton_out(spec, cache, meta, q, k, v, min_tokens=None)
    assert prefills.gathered is None
    ref = reference_out(spec, cache, meta, q, k, v)
    assert not gathered.isnan().any()  # never read a slot that was not written
    assert rel_err(gathered, ref) < 1e-5
    assert rel_err(gathered, paged) < 1e-5


def test_threshold_splits_chunks_by_length():
    """The default rule (G * q_len >= 2048): with GQA 4, chunks from 512 tokens; with a 256-token
    threshold a 300-token chunk over a prefix is gathered, a 17-token one stays on the kernel;
    both are right in the same step."""
    spec, cache, meta, q, k, v = make_case([(16, 17), (40, 300)], 8, 2, 64, seed=1)
    assert TritonAttentionBackend(spec, 1024).sdpa_prefill_min_tokens == 512
    out, prefills = triton_out(spec, cache, meta, q, k, v, min_tokens=256)
    assert prefills.gathered.kv_lens == [340]
    assert prefills.paged.seq_lens.tolist() == [33]
    assert rel_err(out, reference_out(spec, cache, meta, q, k, v)) < 1e-5


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_gathered_on_8bit_cache(kind):
    """The gather dequantizes; fresh prompts on an 8-bit cache go through it too."""
    steps = [(40, 1), (20, 13), (0, 21), (33, 16)]
    spec, cache, meta, q, k, v = make_case(steps, 8, 2, 64, seed=2, kind=kind)
    gathered, prefills = triton_out(spec, cache, meta, q, k, v, min_tokens=0)
    assert len(prefills.gathered.kv_lens) == 3
    paged, _ = triton_out(spec, cache, meta, q, k, v, min_tokens=None)
    ref = reference_out(spec, cache, meta, q, k, v)
    torch.testing.assert_close(gathered, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gathered, paged, rtol=1e-4, atol=1e-4)


def test_layers_with_a_window_stay_on_the_kernel():
    """Alternating local and global layers: the global layer gathers, the local one reads every
    chunk through paged_prefill (with its window), both equal the reference."""
    steps = [(40, 9), (70, 20), (5, 1)]
    spec, cache, meta, q, k, v = make_case(steps, 4, 2, 64, seed=3, layer_windows=(None, 24))
    for layer in (0, 1):
        out, prefills = triton_out(spec, cache, meta, q, k, v, min_tokens=0, layer=layer)
        assert len(prefills.gathered.kv_lens) == 2 and prefills.paged is None
        assert prefills.windowed.seq_lens.tolist() == [49, 90]
        ref = reference_out(spec, cache, meta, q, k, v, layer)
        assert rel_err(out, ref) < 1e-5, layer


def test_engine_chunked_prefill_and_prefix_hits_match_transformers(
    model_dir, reference, monkeypatch
):
    """The whole engine on the Triton backend (interpreted on CPU), every chunk over a prefix
    gathered: transformers' greedy tokens, first run (chunked prefill) and second (prefix-cache
    hits)."""
    from engine import LLM, SamplingParams
    from engine import model_runner as mr
    from tests.helpers import random_prompts
    from tests.test_correctness import assert_matches_reference

    def triton_backend(config, model_config, max_model_len, device):
        backend, _ = make(config, model_config, max_model_len, device)
        triton = TritonAttentionBackend(backend.spec, max_model_len)
        triton.sdpa_prefill_min_tokens = 0
        return triton, False  # no CUDA-only fused ops or graphs

    make = mr.make_attention_backend
    monkeypatch.setattr(mr, "make_attention_backend", triton_backend)
    shared = random_prompts([40], seed=1)[0]
    prompts = [shared + s for s in random_prompts([30, 57], seed=2)]
    llm = LLM(model_dir, max_num_batched_tokens=32, num_blocks=64)
    assert type(llm.engine.runner.backend) is TritonAttentionBackend
    greedy = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    for _ in range(2):
        assert_matches_reference(reference, prompts, llm.generate(prompts, greedy), 4)
    assert llm.engine.kv_manager.stats.hit_tokens > 0


# -- GPU: compiled, bf16, the Llama-3-8B attention shape ----------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("varlen", [True, False])
def test_gpu_gathered_bf16_matches_float32_reference(varlen):
    steps = [(1024, 512), (0, 300), (3072, 1024), (5, 1), (16, 300), (1000, 17)]
    for seed in range(2):
        case = make_case(steps, 32, 8, 128, seed, dtype=torch.bfloat16)
        spec, cache, meta, q, k, v = case
        out, prefills = triton_out(spec, cache, meta, q, k, v, min_tokens=0, varlen=varlen)
        assert prefills.gathered.q_rows is not None  # the fresh prompt and decode between
        ref = reference_out(spec, cache, meta, q, k, v)
        assert not out.isnan().any()
        assert rel_err(out, ref) < tolerance(torch.bfloat16), (varlen, seed)
        paged, _ = triton_out(spec, cache, meta, q, k, v, min_tokens=None)
        assert rel_err(out, paged) < tolerance(torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_engine_gathered_matches_reference(model_dir, reference):
    """float32 engine on CUDA (per-chunk SDPA: flash takes no float32), every chunk over a prefix
    gathered: transformers' tokens through chunked prefill and prefix-cache hits."""
    from engine import LLM, SamplingParams
    from tests.helpers import PROMPT_LENGTHS, random_prompts
    from tests.test_correctness import assert_matches_reference

    prompts = random_prompts(PROMPT_LENGTHS)
    llm = LLM(model_dir, device="cuda", dtype="float32", max_num_batched_tokens=32, num_blocks=512)
    llm.engine.runner.backend.sdpa_prefill_min_tokens = 0
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    for _ in range(2):
        assert_matches_reference(reference, prompts, llm.generate(prompts, greedy), 12)
    assert llm.engine.kv_manager.stats.hit_tokens > 0


def test_fresh_runs_group_adjacent_chunks():
    """Fresh chunks in row order become runs of adjacent ones, each with its offsets."""
    from engine.attention.triton_backend import fresh_runs

    runs = fresh_runs([(3, 10), (10, 30), (40, 41), (41, 45), (45, 50), (60, 61)], "cpu")
    assert [(r.start, r.end, r.max_len) for r in runs] == [(3, 30, 20), (40, 50, 5), (60, 61, 1)]
    assert [r.cu_seqlens.tolist() for r in runs] == [[0, 7, 27], [0, 1, 5, 10], [0, 1]]
    assert all(r.cu_seqlens.dtype == torch.int32 for r in runs)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_fresh_prompts_varlen_match_float32_reference():
    """Fresh prompts through varlen flash (one call per run of adjacent ones; not cuDNN's SDPA,
    which plans every new length): two adjacent, one after a chunk over a prefix, one after a
    decode; equal to the float32 reference and to the SDPA path."""
    steps = [(0, 700), (0, 1333), (512, 300), (0, 37), (5, 1), (0, 2048)]
    for seed in range(2):
        spec, cache, meta, q, k, v = make_case(steps, 32, 8, 128, seed, dtype=torch.bfloat16)
        out, prefills = triton_out(spec, cache, meta, q, k, v, min_tokens=0)
        assert [r.end - r.start for r in prefills.fresh_runs] == [2033, 37, 2048]
        ref = reference_out(spec, cache, meta, q, k, v)
        assert not out.isnan().any()
        assert rel_err(out, ref) < tolerance(torch.bfloat16), seed
        backend = TritonAttentionBackend(spec, max_model_len=8192)
        backend.fresh_prefill_varlen = False
        m = copy_meta(meta, cache.device)
        backend.prepare(m)
        assert m.backend_data[1].fresh_runs is None
        sdpa = backend.forward(q, k, v, cache.clone(), m).float().cpu()
        assert rel_err(out, sdpa) < tolerance(torch.bfloat16)
