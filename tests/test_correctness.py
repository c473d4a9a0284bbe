"""Greedy outputs equal the transformers reference under every scheduling path."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.testing import write_test_checkpoint
from tests.helpers import PROMPT_LENGTHS, Reference, capture_first_logits, random_prompts

MAX_TOKENS = 12
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)


def assert_matches_reference(reference, prompts, outputs, max_tokens):
    if isinstance(max_tokens, int):
        max_tokens = [max_tokens] * len(prompts)
    for prompt, out, n in zip(prompts, outputs, max_tokens):
        expected = reference.greedy(prompt, n)
        assert out.token_ids == expected, f"prompt of {len(prompt)} tokens diverged"
        assert out.finish_reason == "length"


def assert_pool_whole(llm):
    kv = llm.engine.kv_manager
    assert kv.num_free_blocks == kv.num_blocks
    assert all(b.ref_cnt == 0 for b in kv.pool.blocks)


def test_chunked_prefill_small_budget(model_dir, reference):
    prompts = random_prompts(PROMPT_LENGTHS)
    llm = LLM(model_dir, max_num_batched_tokens=32, enable_prefix_caching=False, num_blocks=512)
    captured = capture_first_logits(llm)
    outputs = llm.generate(prompts, GREEDY)
    assert_matches_reference(reference, prompts, outputs, MAX_TOKENS)
    assert_pool_whole(llm)
    # Last-position logits of each prompt within 1e-4 relative error of the reference.
    for prompt, out in zip(prompts, outputs):
        ours = captured[out.request_id]
        ref = reference.last_logits(prompt)
        rel = (ours - ref).norm() / ref.norm()
        assert rel < 1e-4, f"prompt of {len(prompt)} tokens: relative logit error {rel:.2e}"


def test_prefix_cache_hits_give_same_tokens(model_dir, reference):
    shared = random_prompts([40, 100], seed=1)
    suffixes = random_prompts(PROMPT_LENGTHS, seed=2)
    prompts = [shared[i % 2] + s for i, s in enumerate(suffixes)]
    prompts = [p[:300] for p in prompts]
    llm = LLM(model_dir, max_num_batched_tokens=128, num_blocks=512)
    first = llm.generate(prompts, GREEDY)
    assert_matches_reference(reference, prompts, first, MAX_TOKENS)
    hits_before = llm.engine.kv_manager.stats.hit_tokens
    second = llm.generate(prompts, GREEDY)
    assert_matches_reference(reference, prompts, second, MAX_TOKENS)
    stats = llm.engine.kv_manager.stats
    assert stats.hit_tokens > hits_before and stats.hit_rate > 0
    # Every prompt of two or more blocks is served mostly from cache the second time.
    for prompt, out in zip(prompts, second):
        assert out.num_cached_tokens == (len(prompt) - 1) // 16 * 16
    assert_pool_whole(llm)


def test_forced_preemption(model_dir, reference):
    prompts = random_prompts(PROMPT_LENGTHS, seed=3)
    # The longest request needs ceil((300 + 12) / 16) = 20 blocks; 24 blocks force preemption.
    llm = LLM(model_dir, max_num_batched_tokens=64, num_blocks=24)
    outputs = llm.generate(prompts, GREEDY)
    assert llm.engine.scheduler.num_preemptions > 0
    assert_matches_reference(reference, prompts, outputs, MAX_TOKENS)
    assert_pool_whole(llm)


def test_forced_preemption_without_prefix_cache(model_dir, reference):
    prompts = random_prompts(PROMPT_LENGTHS, seed=4)
    llm = LLM(model_dir, max_num_batched_tokens=48, num_blocks=22, enable_prefix_caching=False)
    outputs = llm.generate(prompts, GREEDY)
    assert llm.engine.scheduler.num_preemptions > 0
    assert_matches_reference(reference, prompts, outputs, MAX_TOKENS)
    assert_pool_whole(llm)


def test_mixed_max_tokens(model_dir, reference):
    prompts = random_prompts(PROMPT_LENGTHS, seed=5)
    max_tokens = [1 + (7 * i) % 24 for i in range(len(prompts))]
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in max_tokens]
    llm = LLM(model_dir, max_num_batched_tokens=96, num_blocks=128)
    outputs = llm.generate(prompts, params)
    assert [len(o.token_ids) for o in outputs] == max_tokens
    assert_matches_reference(reference, prompts, outputs, max_tokens)
    assert_pool_whole(llm)


VARIANTS = {
    "mistral": dict(architecture="mistral"),
    "qwen2-bias": dict(architecture="qwen2"),
    "tied-embeddings": dict(tie_word_embeddings=True),
    "llama3-rope-scaling": dict(
        max_position_embeddings=1024,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "sharded-mha-head-dim": dict(num_shards=3, num_key_value_heads=4, head_dim=32),
    "bfloat16-checkpoint": dict(dtype="bfloat16"),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_architecture_variants(tmp_path, variant):
    path = write_test_checkpoint(tmp_path, seed=7, **VARIANTS[variant])
    reference = Reference(path)
    prompts = random_prompts([1, 20, 90, 200], seed=6)
    llm = LLM(path, dtype="float32", max_num_batched_tokens=64, num_blocks=128)
    outputs = llm.generate(prompts, GREEDY)
    assert_matches_reference(reference, prompts, outputs, MAX_TOKENS)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_logits_close(model_dir, reference, dtype):
    prompt = random_prompts([50], seed=8)[0]
    llm = LLM(model_dir, dtype=dtype, num_blocks=64)
    assert llm.engine.runner.kv_caches[0].dtype == getattr(torch, dtype)
    captured = []
    execute = llm.engine.runner.execute

    def capture(sched):
        out = execute(sched)
        captured.append(out.logits)
        return out

    llm.engine.runner.execute = capture
    llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0))
    ref = reference.last_logits(prompt)
    rel = (captured[0][0].float() - ref).norm() / ref.norm()
    assert rel < 5e-2
