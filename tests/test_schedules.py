"""Randomized schedules: arrivals, aborts and budgets; every block returns to the pool, and the
requests that ran to the end still match the reference."""

from __future__ import annotations

import random

import pytest

from engine import LLM, SamplingParams
from engine.scheduler import Scheduler
from tests.helpers import random_prompts


def check_invariants(engine):
    kv = engine.kv_manager
    held = {}
    for request in engine.scheduler.running:
        for block_id in kv.block_ids(request.request_id):
            held[block_id] = held.get(block_id, 0) + 1
    for block in kv.pool.blocks:
        assert block.ref_cnt == held.get(block.block_id, 0), f"block {block.block_id} ref count"
    assert kv.num_free_blocks == kv.num_blocks - len(held)
    for request in engine.scheduler.waiting:
        assert kv.block_ids(request.request_id) == []


@pytest.mark.parametrize(
    "seed, async_scheduling", [(s, False) for s in range(8)] + [(s, True) for s in range(4)]
)
def test_random_schedules_return_every_block(model_dir, reference, seed, async_scheduling):
    rng = random.Random(seed)
    budget = rng.choice([8, 32, 64, 128])
    num_blocks = rng.choice([17, 19, 21, 200])
    llm = LLM(
        model_dir,
        async_scheduling=async_scheduling,
        max_num_batched_tokens=budget,
        max_num_seqs=rng.choice([2, 4, 64]),
        num_blocks=num_blocks,
        enable_prefix_caching=rng.random() < 0.7,
    )
    engine = llm.engine
    base = random_prompts([60], seed=100)[0]  # a shared prefix, for cache hits
    lengths = [rng.randint(1, 200) for _ in range(16)]
    prompts = [
        (base[: rng.randint(0, 60)] + p)[:250] if rng.random() < 0.5 else p
        for p in random_prompts(lengths, seed=seed)
    ]
    max_tokens = [rng.randint(1, 24) for _ in prompts]
    pending = list(range(len(prompts)))
    aborted, finished = set(), {}
    steps = 0
    while pending or engine.has_unfinished_requests():
        for _ in range(rng.choice([0, 0, 1, 4])):  # arrivals, sometimes in bursts
            if pending:
                i = pending.pop(0)
                params = SamplingParams(max_tokens=max_tokens[i], temperature=0.0, ignore_eos=True)
                engine.add_request(str(i), prompts[i], params)
        if rng.random() < 0.03 and engine.scheduler.requests:  # an abort, in any state
            victim = rng.choice(sorted(engine.scheduler.requests))
            engine.abort_request(victim)
            aborted.add(int(victim))
        for out in engine.step() if engine.has_unfinished_requests() else []:
            if out.finished:
                finished[int(out.request_id)] = out.token_ids
        check_invariants(engine)
        steps += 1
        assert steps < 5000, "the engine stopped making progress"
    assert engine.kv_manager.num_free_blocks == num_blocks
    print(
        f"seed {seed}: preemptions {engine.scheduler.num_preemptions} aborted {len(aborted)} "
        f"hit rate {engine.kv_manager.stats.hit_rate:.2f}"
    )
    assert set(finished) | aborted == set(range(len(prompts)))
    for i, tokens in finished.items():
        assert tokens == reference.greedy(prompts[i], max_tokens[i])


def test_oldest_request_is_never_preempted(model_dir):
    llm = LLM(model_dir, max_num_batched_tokens=64, num_blocks=24)
    scheduler: Scheduler = llm.engine.scheduler
    prompts = random_prompts([200, 150, 150, 100], seed=9)
    for i, p in enumerate(prompts):
        llm.engine.add_request(str(i), p, SamplingParams(max_tokens=30, ignore_eos=True))
    first = scheduler.requests["0"]
    while llm.engine.has_unfinished_requests():
        llm.engine.step()
    assert scheduler.num_preemptions > 0
    assert first.num_preemptions == 0
