"""Decode CUDA graphs with the output head and argmax inside, the one-copy token read, and async
scheduling, on one GPU (`pytest -m gpu`): greedy tokens equal the reference and eager's, logits
taken from a graph's output equal eager's, and every block returns to the pool. Graphs with and
without async scheduling against eager over every bucket: test_gpu_engine.py."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.model_runner import TokenReader
from tests.helpers import PROMPT_LENGTHS, random_prompts
from tests.test_async_scheduling import count_chained
from tests.test_correctness import assert_matches_reference, assert_pool_whole

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def gpu_llm(model_dir, **kwargs):
    kwargs.setdefault("dtype", "float32")
    return LLM(model_dir, device="cuda", **kwargs)


def test_token_reader_buffers_in_turn():
    reader = TokenReader(torch.device("cuda"))
    a = torch.arange(5, device="cuda")
    b = torch.arange(100, 103, device="cuda")
    first, second = reader.start(a), reader.start(b)  # two copies under way, one buffer each
    assert reader.finish(first) == [0, 1, 2, 3, 4]
    third = reader.start(a * 2)  # the first buffer again, read already
    assert reader.finish(second) == [100, 101, 102]
    assert reader.finish(third) == [0, 2, 4, 6, 8]


def test_async_graphs_chain_and_match_reference(model_dir, reference):
    prompts = random_prompts(PROMPT_LENGTHS)
    llm = gpu_llm(model_dir, async_scheduling=True, max_num_batched_tokens=64, num_blocks=512)
    chained = count_chained(llm)
    outputs = llm.generate(prompts, GREEDY)
    assert chained[0] >= 5  # the steps after the last admission
    assert_matches_reference(reference, prompts, outputs, 12)
    assert_pool_whole(llm)


def test_async_graphs_match_reference_with_preemption(model_dir, reference):
    prompts = random_prompts(PROMPT_LENGTHS, seed=3)
    llm = gpu_llm(model_dir, async_scheduling=True, max_num_batched_tokens=64, num_blocks=24)
    outputs = llm.generate(prompts, GREEDY)
    assert llm.engine.scheduler.num_preemptions > 0
    assert_matches_reference(reference, prompts, outputs, 12)
    assert_pool_whole(llm)


def test_async_graphs_stop_tokens_free_the_wasted_slot(model_dir, reference):
    prompts = random_prompts([5, 16, 40, 90], seed=4)
    params = [
        SamplingParams(max_tokens=30, temperature=0.0, stop_token_ids=[reference.greedy(p, 5)[4]])
        for p in prompts
    ]
    llm = gpu_llm(model_dir, async_scheduling=True, num_blocks=64)
    outputs = llm.generate(prompts, params)
    for prompt, out in zip(prompts, outputs):
        assert out.finish_reason == "stop" and len(out.token_ids) <= 5
        assert out.token_ids == reference.greedy(prompt, 5)[: len(out.token_ids)]
    assert_pool_whole(llm)


def test_logits_from_graph_output_equal_eager(model_dir):
    """Steps that need the logits (logprobs, sampling) read them from the graph's output."""
    prompts = random_prompts([5, 30, 70], seed=6)
    params = [
        SamplingParams(max_tokens=10, temperature=0.0, logprobs=3, ignore_eos=True),
        SamplingParams(max_tokens=10, temperature=0.8, seed=7, ignore_eos=True),
        SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True),
    ]
    outs = []
    for eager in (False, True):
        llm = gpu_llm(model_dir, enforce_eager=eager, num_blocks=64, max_num_seqs=4)
        outs.append(llm.generate(prompts, params))
        assert_pool_whole(llm)
    graphs, eager = outs
    assert [o.token_ids for o in graphs] == [o.token_ids for o in eager]
    for (g_lp, g_top), (e_lp, e_top) in zip(graphs[0].logprobs, eager[0].logprobs):
        assert abs(g_lp - e_lp) < 1e-4
        assert [t for t, _ in g_top] == [t for t, _ in e_top]
