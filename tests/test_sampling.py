"""Sampling parameters: each one changes what it should, seeds reproduce, stops stop."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.request import Request
from engine.sampler import Sampler, apply_penalties
from tests.helpers import random_prompts


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(model_dir, num_blocks=256, max_num_batched_tokens=256)


def test_seeded_sampling_reproduces_regardless_of_batch(llm):
    prompts = random_prompts([5, 30, 70], seed=11)
    params = SamplingParams(max_tokens=16, temperature=1.0, seed=1234, ignore_eos=True)
    alone = llm.generate([prompts[0]], params)[0].token_ids
    unseeded = SamplingParams(max_tokens=16, temperature=1.0, ignore_eos=True)
    batched = llm.generate(prompts, [params, unseeded, unseeded])[0].token_ids
    assert alone == batched
    other_seed = SamplingParams(max_tokens=16, temperature=1.0, seed=99, ignore_eos=True)
    assert llm.generate([prompts[0]], other_seed)[0].token_ids != alone


def test_top_k_1_and_tiny_top_p_are_greedy(llm):
    prompt = random_prompts([40], seed=12)[0]
    greedy = llm.generate(prompt, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
    for params in (
        SamplingParams(max_tokens=10, temperature=5.0, top_k=1, ignore_eos=True),
        SamplingParams(max_tokens=10, temperature=5.0, top_p=1e-6, ignore_eos=True),
        SamplingParams(max_tokens=10, temperature=5.0, min_p=1.0, ignore_eos=True),
    ):
        assert llm.generate(prompt, params)[0].token_ids == greedy[0].token_ids


def test_top_k_draws_only_from_top_k():
    logits = torch.randn(1, 50)
    top5 = set(logits[0].topk(5).indices.tolist())
    sampler = Sampler(torch.device("cpu"), seed=0)
    request = Request("r", [1], SamplingParams(temperature=2.0, top_k=5))
    draws = {sampler(logits, [request]).token_ids[0] for _ in range(200)}
    assert draws <= top5 and len(draws) > 1


def test_top_p_keeps_the_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    sampler = Sampler(torch.device("cpu"), seed=0)
    request = Request("r", [1], SamplingParams(temperature=1.0, top_p=0.75))
    draws = {sampler(probs.log(), [request]).token_ids[0] for _ in range(300)}
    assert draws == {0, 1}


def test_penalties_follow_their_definitions():
    logits = torch.tensor([[2.0, -2.0, 1.0, 1.0]])
    request = Request(
        "r",
        [0, 1],
        SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25),
    )
    request.append_output_token(2)
    request.append_output_token(2)
    out = apply_penalties(logits.clone(), [request])[0].tolist()
    # token 0, 1: in the prompt (repetition only); token 2: in the output twice; token 3: unseen.
    assert out == pytest.approx([1.0, -4.0, 0.5 - 0.5 - 0.5, 1.0])


def test_stop_token_ids_and_max_tokens(llm):
    prompt = random_prompts([20], seed=13)[0]
    free = llm.generate(prompt, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))[0]
    stop_at = free.token_ids[5]
    out = llm.generate(
        prompt,
        SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, stop_token_ids=[stop_at]),
    )[0]
    first = free.token_ids.index(stop_at)
    assert out.token_ids == free.token_ids[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_at
    assert free.finish_reason == "length" and len(free.token_ids) == 12


def test_eos_stops_unless_ignored(llm):
    eos = llm.engine.model_config.eos_token_ids[0]
    prompt = random_prompts([20], seed=14)[0]
    # Whether a random model ever emits EOS is luck, so check the stop rule itself.
    scheduler = llm.engine.scheduler
    request = Request("x", prompt, SamplingParams(max_tokens=5))
    request.append_output_token(eos)
    assert scheduler._check_stop(request, eos).value == "stop"
    request = Request("y", prompt, SamplingParams(max_tokens=5, ignore_eos=True))
    request.append_output_token(eos)
    assert scheduler._check_stop(request, eos) is None


def test_stop_strings_truncate_text(llm):
    prompt = "Alice was beginning to get very tired"
    free = llm.generate(prompt, SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))[0]
    assert len(free.text) > 6
    stop = free.text[3:6]
    out = llm.generate(
        prompt, SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, stop=[stop])
    )[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == free.text[: free.text.index(stop)]
    kept = llm.generate(
        prompt,
        SamplingParams(
            max_tokens=20,
            temperature=0.0,
            ignore_eos=True,
            stop=[stop],
            include_stop_str_in_output=True,
        ),
    )[0]
    assert kept.text == free.text[: free.text.index(stop) + len(stop)]


def test_streamed_deltas_add_up_and_hold_back_stop_prefixes(model_dir):
    llm = LLM(model_dir, num_blocks=64)
    engine = llm.engine
    prompt = "The café was"
    free = llm.generate(prompt, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))[0]
    stop = free.text[-4:]
    engine.add_request(
        "s", prompt, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, stop=[stop])
    )
    deltas, tokens = [], []
    while engine.has_unfinished_requests():
        for out in engine.step():
            deltas.append(out.new_text)
            tokens.extend(out.new_token_ids)
            assert stop not in "".join(deltas)
            # Nothing streamed is ever revised (a character split across tokens is held back).
            assert free.text.startswith("".join(deltas))
    assert "".join(deltas) == out.text == free.text[: free.text.index(stop)]
    assert tokens == out.token_ids


def test_logprobs_are_the_model_distribution(llm, reference):
    prompt = random_prompts([30], seed=15)[0]
    out = llm.generate(prompt, SamplingParams(max_tokens=1, temperature=0.0, logprobs=5))[0]
    ((chosen, top),) = out.logprobs
    ref = reference.last_logits(prompt).log_softmax(-1)
    values, indices = ref.topk(5)
    assert [t for t, _ in top] == indices.tolist()
    assert [lp for _, lp in top] == pytest.approx(values.tolist(), abs=1e-4)
    assert chosen == pytest.approx(values[0].item(), abs=1e-4)
