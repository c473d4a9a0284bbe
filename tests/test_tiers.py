"""Tier selection on constructed states: quality floors, cost, SLO likelihood, difficulty."""

from __future__ import annotations

from router.placement import GoodputPlacement, PlacementInfo
from router.tiers import DifficultyEstimator, TierCost, TierSelector
from router.workers import Worker


def setup(cost_weight=0.0):
    workers = [
        Worker(f"{tier}-{role}", role, tier, client=None)
        for tier in ("small", "large")
        for role in ("prefill", "decode")
    ]
    costs = {
        "small": TierCost("small", 0.6, 1 / 3600, 1 / 3600),  # $1 per instance-hour
        "large": TierCost("large", 0.9, 8 / 3600, 8 / 3600),  # $8
    }
    placement = GoodputPlacement()
    return workers, placement, TierSelector(costs, placement, cost_weight=cost_weight)


def infos(tokens=200, max_tokens=32, ttft=1.0, tpot=0.1):
    return {
        t: PlacementInfo(t, [5] * tokens, max_tokens, ttft, tpot, 16, 1024)
        for t in ("small", "large")
    }


def test_quality_floor_picks_the_cheapest_tier_that_reaches_it():
    workers, _, selector = setup()
    assert selector.choose(workers, infos(), "hello", min_quality=0.5).tier == "small"
    assert selector.choose(workers, infos(), "hello", min_quality=0.8).tier == "large"


def test_quality_minus_cost():
    workers, _, selector = setup(cost_weight=0.0)
    assert selector.choose(workers, infos(), "hello").tier == "large"  # cost does not count
    workers, _, selector = setup(cost_weight=1e6)  # cost counts a lot: the cheap tier
    choice = selector.choose(workers, infos(), "hello")
    assert choice.tier == "small" and choice.estimated_cost > 0


def test_cost_budget_and_cost_estimate_order():
    workers, _, selector = setup()
    small_cost, _ = selector.estimate(workers, infos()["small"])
    large_cost, _ = selector.estimate(workers, infos()["large"])
    assert large_cost > small_cost
    choice = selector.choose(workers, infos(), "hello", max_cost=(small_cost + large_cost) / 2)
    assert choice.tier == "small"


def test_degrades_when_the_large_tier_cannot_meet_the_slo():
    workers, placement, selector = setup()
    large_prefill = workers[2]
    for i in range(40):  # the large tier's prefill instance is deeply queued
        queued = PlacementInfo("large", [7 + i] * 4000, 32, 1.0, 0.1, 16, 1024)
        placement.on_placed(large_prefill, workers[3], queued, f"q{i}")
    _, p_large = selector.estimate(workers, infos(ttft=0.2)["large"])
    assert p_large < 0.5
    assert selector.choose(workers, infos(ttft=0.2), "hello").tier == "small"


def test_hard_prompts_need_more_quality():
    estimator = DifficultyEstimator()
    easy = estimator.estimate("What is the capital of France?", 8)
    hard = estimator.estimate("Prove the theorem step by step and derive the integral 2x+3=7", 20)
    assert hard > easy
    workers, _, selector = setup()
    selector.difficulty_weight = 3.0  # a hard prompt now needs more than the small tier's 0.6
    easy_prompt = "What is the capital of France?"
    assert selector.choose(workers, infos(), easy_prompt, min_quality=0.1).tier == "small"
    hard_prompt = "Prove the theorem step by step: derive the integral equation"
    assert selector.choose(workers, infos(), hard_prompt, min_quality=0.1).tier == "large"
