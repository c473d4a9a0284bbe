"""Piecewise prefill graphs (engine/prefill_graphs.py) compute what the fused model computes.

On CPU the pieces run eagerly on their static buffers under Triton's interpreter (no graphs
there): the split into pieces, the buffers, the padding rows and the per-layer attention
between them are what is checked. On a GPU (`pytest -m gpu`) the same test captures and
replays the graphs, and the engine's greedy outputs with them are checked against eager steps.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", minversion=None if torch.cuda.is_available() else "3.9")

from engine.attention.backend import AttentionMetadata, AttentionSpec  # noqa: E402
from engine.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from engine.config import ModelConfig  # noqa: E402
from engine.loader import load_model  # noqa: E402
from engine.prefill_graphs import PrefillGraphs, prefill_graph_sizes, supports  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
pytestmark = [pytest.mark.gpu] if CUDA else []


def _fused(model_dir):
    cfg = ModelConfig.from_pretrained(model_dir)
    spec = AttentionSpec(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.head_dim**-0.5)
    backend = TritonAttentionBackend(spec, 1024)
    model = load_model(model_dir, cfg, backend, torch.float32, torch.device(DEVICE))
    model.fuse_for_cuda()
    return cfg, backend, model


def _run_steps(model_dir, pieces: bool):
    """Prefill two prompts (one spanning a block boundary), decode one token each, continue
    the first with a 3-token chunk over its cached prefix, then a step of one new prompt
    beside a decode. Hidden states per step, and the KV cache after them."""
    cfg, backend, model = _fused(model_dir)
    device = torch.device(DEVICE)
    cache = [
        torch.zeros(2, 8, 16, cfg.num_kv_heads, cfg.head_dim, device=device)
        for _ in range(cfg.num_layers)
    ]
    # Buckets that pad every step (20 tokens -> 32, 2 -> 4, 3 -> 4, 6 -> 8): rows past the
    # step's hold what earlier steps left there.
    graphs = PrefillGraphs(model, backend, [4, 8, 32], device, capture=CUDA) if pieces else None
    tables = torch.tensor([[3, 5, 0], [6, 0, 0], [7, 0, 0]], device=device)
    g = torch.Generator().manual_seed(4)
    prompt = [torch.randint(3, cfg.vocab_size, (n,), generator=g).tolist() for n in (17, 3, 5)]
    steps = [  # (token ids, positions, per-sequence (table row, num cached, num new))
        (prompt[0] + prompt[1], list(range(17)) + list(range(3)), [(0, 0, 17), (1, 0, 3)]),
        ([7, 8], [17, 3], [(0, 17, 1), (1, 3, 1)]),
        ([9, 10, 11], [18, 19, 20], [(0, 18, 3)]),
        ([12] + prompt[2], [4] + list(range(5)), [(1, 4, 1), (2, 0, 5)]),
    ]
    outputs, layers_done = [], []
    with torch.inference_mode():
        for ids, pos, seqs in steps:
            pos_t = torch.tensor(pos, device=device)
            rows = torch.repeat_interleave(
                torch.tensor([r for r, _, _ in seqs]), torch.tensor([n for _, _, n in seqs])
            ).to(device)
            slots = tables[rows, pos_t // 16] * 16 + pos_t % 16
            starts = [0]
            for _, _, n in seqs:
                starts.append(starts[-1] + n)
            meta = AttentionMetadata(
                slots, starts, [c + n for _, c, n in seqs], tables[[r for r, _, _ in seqs]], 16
            )
            backend.prepare(meta)
            ids_t = torch.tensor(ids, device=device)
            if graphs is None:
                outputs.append(model(ids_t, pos_t, cache, meta).clone())
            else:
                out = graphs.forward(ids_t, pos_t, cache, meta, layers_done.append)
                outputs.append(out.clone())
    return outputs, cache, layers_done


def test_pieces_equal_the_fused_model(model_dir):
    ours, our_cache, layers_done = _run_steps(model_dir, pieces=True)
    ref, ref_cache, _ = _run_steps(model_dir, pieces=False)
    for step, (a, b) in enumerate(zip(ours, ref, strict=True)):
        assert a.shape == b.shape
        err = float((a - b).norm() / b.norm())
        assert err < 1e-5, f"step {step}: {err:.2e}"
    for layer, (a, b) in enumerate(zip(our_cache, ref_cache, strict=True)):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), f"layer {layer}'s KV"
    num_layers = len(our_cache)
    assert layers_done == list(range(num_layers)) * 4  # each layer's KV, in order, each step


def test_sizes_and_what_is_supported(model_dir):
    assert prefill_graph_sizes(2048)[-1] == 2048 and prefill_graph_sizes(2048)[0] == 16
    assert prefill_graph_sizes(100)[-1] == 128  # the largest bucket holds the budget
    assert prefill_graph_sizes(10**6)[-1] == 4096  # beyond: eager
    _, backend, model = _fused(model_dir)
    assert supports(model, backend, quantized=False)
    assert not supports(model, backend, quantized=True)
    graphs = PrefillGraphs(model, backend, [4, 8], torch.device(DEVICE), capture=False)
    assert [graphs.size_for(n) for n in (1, 4, 5, 8, 9)] == [4, 4, 8, 8, None]


@pytest.mark.skipif(not CUDA, reason="CUDA graphs")
def test_engine_greedy_outputs_equal_with_and_without_prefill_graphs(model_dir):
    """Chunked prefill (a budget of 48 tokens), prefix-cache hits (shared first blocks) and
    steps mixing prompts with decodes: the same tokens with the graphs as without."""
    from engine import LLM, SamplingParams

    g = torch.Generator().manual_seed(7)
    shared = torch.randint(3, 200, (40,), generator=g).tolist()
    prompts = [shared + torch.randint(3, 200, (n,), generator=g).tolist() for n in (5, 30, 70)]
    prompts += [torch.randint(3, 200, (n,), generator=g).tolist() for n in (3, 90)]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    outputs = {}
    for graphs in (True, False):
        llm = LLM(
            model_dir, dtype="float32", max_num_batched_tokens=48, num_blocks=256,
            enable_prefix_caching=True, prefill_graphs=graphs,
        )  # fmt: skip
        assert (llm.engine.runner.prefill_graphs is not None) == graphs
        outputs[graphs] = [o.token_ids for o in llm.generate(prompts, params)]
        kv = llm.engine.kv_manager
        assert kv.num_free_blocks == kv.num_blocks  # every block back (cached ones are free)
    assert outputs[True] == outputs[False]
