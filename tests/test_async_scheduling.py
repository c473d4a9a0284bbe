"""Async scheduling (`EngineConfig.async_scheduling`): a greedy decode step is launched before
the previous step's tokens are read, its inputs taken from those tokens on the device. Outputs
equal the reference and the synchronous engine's; a request that the step in flight finishes
(stop token, stop string, abort) wastes one slot, and every block still returns to the pool."""

from __future__ import annotations

import pytest

from engine import LLM, SamplingParams
from tests.helpers import PROMPT_LENGTHS, random_prompts
from tests.test_correctness import assert_matches_reference, assert_pool_whole
from tests.test_schedules import check_invariants

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def count_chained(llm) -> list[int]:
    """Counts, as `llm` runs, the steps launched with `prev` (chained: inputs from the device)."""
    runner = llm.engine.runner
    launch, chained = runner.launch, [0]

    def counting(sched, prev=None):
        if prev is not None:
            assert all(s.prev_row is not None for s in sched.scheduled)
            chained[0] += 1
        return launch(sched, prev)

    runner.launch = counting
    return chained


def test_outputs_match_reference_and_steps_chain(model_dir, reference):
    prompts = random_prompts(PROMPT_LENGTHS)
    llm = LLM(model_dir, async_scheduling=True, max_num_batched_tokens=64, num_blocks=512)
    chained = count_chained(llm)
    outputs = llm.generate(prompts, GREEDY)
    assert_matches_reference(reference, prompts, outputs, 12)
    assert chained[0] >= 5
    again = llm.generate(prompts, GREEDY)  # from the prefix cache, the blocks chained steps filled
    assert_matches_reference(reference, prompts, again, 12)
    assert llm.engine.kv_manager.stats.hit_tokens > 0
    assert_pool_whole(llm)


def test_preemption_matches_reference(model_dir, reference):
    prompts = random_prompts(PROMPT_LENGTHS, seed=3)
    llm = LLM(model_dir, async_scheduling=True, max_num_batched_tokens=64, num_blocks=24)
    outputs = llm.generate(prompts, GREEDY)
    assert llm.engine.scheduler.num_preemptions > 0
    assert_matches_reference(reference, prompts, outputs, 12)
    assert_pool_whole(llm)


@pytest.mark.parametrize("stop", ["token", "string"])
def test_request_finished_by_step_in_flight_frees_its_slot(model_dir, reference, stop):
    """Each request stops early (its 5th token as a stop token, or a stop string from its 5th
    token's text) while the step after was already launched: that step's token is dropped,
    the outputs are the synchronous engine's, and every block comes back."""
    prompts = random_prompts([5, 16, 40, 90], seed=4)
    results = []
    for async_scheduling in (False, True):
        llm = LLM(model_dir, async_scheduling=async_scheduling, num_blocks=64)
        tokenizer = llm.engine.tokenizer
        params = []
        for prompt in prompts:
            first5 = reference.greedy(prompt, 5)
            if stop == "token":
                kw = dict(stop_token_ids=[first5[4]])
            else:
                kw = dict(stop=[tokenizer.decode(first5)[-2:]])
            params.append(SamplingParams(max_tokens=30, temperature=0.0, **kw))
        chained = count_chained(llm)
        outputs = llm.generate(prompts, params)
        assert chained[0] > 0 or not async_scheduling
        for prompt, out in zip(prompts, outputs):
            assert out.finish_reason == "stop"
            assert out.token_ids == reference.greedy(prompt, 30)[: len(out.token_ids)]
        results.append([(o.token_ids, o.text, o.stop_reason) for o in outputs])
        assert_pool_whole(llm)
        assert not llm.engine.scheduler.requests
    assert results[0] == results[1]
    if stop == "token":  # at the 5th token, or earlier where the same token came before
        assert all(len(tokens) <= 5 for tokens, _, _ in results[1])


def test_abort_and_arrivals_while_a_step_is_in_flight(model_dir, reference):
    prompts = random_prompts([7, 33, 64, 100], seed=5)
    llm = LLM(model_dir, async_scheduling=True, num_blocks=64)
    engine = llm.engine
    for i, prompt in enumerate(prompts[:3]):
        engine.add_request(str(i), prompt, GREEDY)
    finished = {}
    for step in range(200):
        if step == 4:
            assert engine._in_flight is not None  # decodes are chaining by now
            finished["1"] = engine.abort_request("1")
            engine.add_request("3", prompts[3], GREEDY)
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        check_invariants(engine)
        if not engine.has_unfinished_requests():
            break
    assert finished["1"].finish_reason == "abort"
    for i in (0, 2, 3):
        assert finished[str(i)].token_ids == reference.greedy(prompts[i], 12)
    assert_pool_whole(llm)


def test_sampled_requests_give_the_synchronous_engines_tokens(model_dir):
    """Seeded sampling never chains (the sampler needs the logits on the host); mixed with
    greedy requests, the tokens equal the synchronous engine's."""
    prompts = random_prompts([5, 30, 70], seed=6)
    params = [
        SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=10, temperature=0.8, seed=7, ignore_eos=True),
        SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True),
    ]
    results = []
    for async_scheduling in (False, True):
        llm = LLM(model_dir, async_scheduling=async_scheduling, num_blocks=64)
        results.append([o.token_ids for o in llm.generate(prompts, params)])
        assert_pool_whole(llm)
    assert results[0] == results[1]
