"""The planner's simulation behaves like a queueing system should, and the search uses it."""

from __future__ import annotations

import json
import math

import pytest

from deploy.planner import PrefillInstance, Workload, max_rate, plan, simulate
from router.latency_model import new_instance_model

# Prefill 1 ms per token; decode steps 10 ms + 1 ms per request in the batch.
MODEL = new_instance_model(
    {"prefill": [0.0, 1e-3, 0.0], "decode": [0.01, 1e-3, 0.0], "transfer": [0.0, 0.0, 0.0]}
)
WORK = Workload(input_len=100, output_len=20, range_ratio=0.0, num_requests=200, min_duration_s=20)
SLO = (0.5, 0.05)


def test_light_load_meets_slos_heavy_load_does_not():
    assert simulate(MODEL, 1, 1, 1.0, WORK, SLO) == 1.0
    # One prefill instance serves at most 10 req/s of 100-token prompts.
    assert simulate(MODEL, 1, 1, 30.0, WORK, SLO) < 0.5


def test_more_instances_of_the_bottleneck_raise_the_max_rate():
    one = max_rate(MODEL, 1, 1, WORK, SLO)
    assert 5.0 < one < 10.5  # prefill-bound near its 10 req/s service rate
    assert max_rate(MODEL, 2, 1, WORK, SLO) > 1.5 * one


def test_plan_ranks_by_rate_per_gpu_or_cheapest_for_a_target():
    rows = plan(MODEL, WORK, SLO, max_gpus=4)
    assert rows[0]["per_gpu"] == max(r["per_gpu"] for r in rows)
    cheapest = plan(MODEL, WORK, SLO, max_gpus=4, target_rate=12.0)
    assert cheapest and cheapest[0]["max_rate"] >= 12.0
    assert cheapest[0]["gpus"] == min(r["gpus"] for r in cheapest)
    assert cheapest[0]["attainment_at_target"] >= 0.9


def test_a_short_burst_does_not_pass_for_a_sustainable_rate():
    """20 requests at 100 req/s arrive in 0.2 s; a backlog of 2 s of prefill work would meet
    a 5 s TTFT SLO, but no instance sustains 100 req/s of 100-token prompts (10 req/s)."""
    burst = Workload(input_len=100, output_len=20, range_ratio=0.0, num_requests=20)
    loose = (5.0, 0.05)
    assert burst.count(100.0) == 6000  # a minute of arrivals, not 20 requests
    assert simulate(MODEL, 1, 1, 100.0, burst, loose) < 0.2
    assert max_rate(MODEL, 1, 1, burst, loose) < 11.0


def step_model(budget: int, fixed: float = 0.1, per_token: float = 0.0, per_pair: float = 0.0):
    return new_instance_model(
        {
            "prefill": [fixed, per_token, per_pair],
            "decode": [0.01, 0.0, 0.0],
            "transfer": [0.0, 0.0, 0.0],
            "max_num_batched_tokens": budget,
        }
    )


def finish_times(model, lengths: list[int]) -> list[float]:
    """When each prompt's last step ends, all queued at time 0."""
    instance, done = PrefillInstance(model), {}
    for i, length in enumerate(lengths):
        instance.add(i, length, now=0.0)
    instance.run_until(math.inf, done)
    return [done[i] for i in range(len(lengths))]


def test_prompts_that_fit_the_budget_share_a_step():
    assert finish_times(step_model(budget=1000), [300, 300]) == pytest.approx([0.1, 0.1])
    # Without a budget in the profile: one whole prompt per step, as the old planner ran them.
    assert finish_times(step_model(budget=0), [300, 300]) == pytest.approx([0.1, 0.2])


def test_a_long_prompt_is_chunked_and_its_continuation_attends_to_the_cached_part():
    # 1 s per million attention pairs: the steps' times show which chunks ran together.
    model = step_model(budget=1000, fixed=0.0, per_pair=1e-6)
    first = 1000 * 1000 * 1e-6  # 1000 fresh tokens
    second = (500 * 1500 + 200 * 200) * 1e-6  # the rest over its cached 1000, then the next
    assert finish_times(model, [1500, 200]) == pytest.approx([first + second] * 2)


def test_a_request_arriving_during_a_step_joins_the_next():
    instance = PrefillInstance(step_model(budget=1000))
    done = {}
    instance.add(0, 100, now=0.0)
    instance.run_until(0.05, done)  # the first step (0 to 0.1) has started
    instance.add(1, 100, now=0.05)
    instance.run_until(math.inf, done)
    assert done == {0: pytest.approx(0.1), 1: pytest.approx(0.2)}
    instance.add(2, 100, now=1.0)  # idle meanwhile: starts at once
    instance.run_until(math.inf, done)
    assert done[2] == pytest.approx(1.1)


def test_the_request_overhead_counts_in_ttft():
    model = step_model(budget=1000, fixed=0.01)
    light = Workload(input_len=100, output_len=4, range_ratio=0.0, num_requests=50)
    assert simulate(model, 1, 1, 1.0, light, (0.2, 0.1)) == 1.0
    model.request_overhead = 0.25
    assert simulate(model, 1, 1, 1.0, light, (0.2, 0.1)) == 0.0


def test_batching_under_a_budget_sustains_more_than_whole_prompts_per_step():
    """A fixed cost per step is shared by the prompts a step batches."""
    batched = max_rate(step_model(budget=1000, fixed=0.05), 1, 1, WORK, SLO)
    whole = max_rate(step_model(budget=0, fixed=0.05), 1, 1, WORK, SLO)
    assert whole < 20.5  # one 100-token prompt per 50 ms step
    assert batched > 2 * whole


def test_cli_plan_says_so_when_no_split_meets_the_slos(tmp_path, capsys):
    from deploy.cli import main

    profile = tmp_path / "profile.json"
    # a prefill step of at least 1 s against a 100 ms TTFT SLO: nothing can meet it
    profile.write_text('{"prefill": [1.0, 0, 0], "decode": [0.01, 0, 0], "transfer": [0, 0, 0]}')
    args = ["plan", "--profile", str(profile), "--ttft-slo-ms", "100", "--max-gpus", "2"]
    assert main([*args, "--num-requests", "20", "--min-duration-s", "1"]) == 1
    assert "no split within 2 GPUs sustains any rate at the SLOs" in capsys.readouterr().out


# -- GPU types -----------------------------------------------------------------------------------

# A fast, dear card and a slow, cheap one: prefill 4x slower on the cheap one, decode (bound by
# memory bandwidth, closer between cards) 1.2x.
FAST = {"prefill": [0.0, 1e-3, 0.0], "decode": [0.01, 1e-3, 0.0], "transfer": [0.0, 0.0, 0.0]}
CHEAP = {"prefill": [0.0, 4e-3, 0.0], "decode": [0.012, 1.2e-3, 0.0], "transfer": [0.0, 0.0, 0.0]}


def gpu_type_pair(fast_cost: float = 4.0, cheap_cost: float = 1.0):
    from deploy.planner import GpuType

    return [
        GpuType("fast", new_instance_model(FAST), fast_cost),
        GpuType("cheap", new_instance_model(CHEAP), cheap_cost),
    ]


def test_decode_on_another_gpu_type_prices_decode_steps_by_its_model():
    """The prefill pool's model prices prefill, the decode pool's the decode steps: a decode
    model too slow for the TPOT SLO fails every request however fast prefill is."""
    slow_decode = new_instance_model(
        {"prefill": [0.0, 1e-3, 0.0], "decode": [0.06, 0.0, 0.0], "transfer": [0.0, 0.0, 0.0]}
    )
    assert simulate(MODEL, 1, 1, 1.0, WORK, SLO) == 1.0
    assert simulate(MODEL, 1, 1, 1.0, WORK, SLO, decode_model=slow_decode) == 0.0
    assert simulate(slow_decode, 1, 1, 1.0, WORK, SLO, decode_model=MODEL) == 1.0


def test_plan_puts_prefill_on_the_fast_card_and_decode_on_the_cheap_one_per_dollar():
    """DistServe's case for disaggregation across hardware: the best requests per dollar come
    from prefill on the card that computes fastest and decode on the cheaper card, whose
    decode steps are nearly as fast. Every type pairing is searched."""
    rows = plan(gpu_type_pair(), WORK, SLO, max_gpus=3)
    pairs = {(r["prefill_type"], r["decode_type"]) for r in rows}
    assert pairs == {("fast", "fast"), ("fast", "cheap"), ("cheap", "fast"), ("cheap", "cheap")}
    best = rows[0]
    assert (best["prefill_type"], best["decode_type"]) == ("fast", "cheap")
    assert best["per_dollar"] == max(r["per_dollar"] for r in rows)
    assert best["cost_per_hour"] == best["prefill"] * 4.0 + best["decode"] * 1.0
    # Without prices the ranking is per GPU, where the fast card everywhere is no worse.
    unpriced = plan(gpu_type_pair(0.0, 0.0), WORK, SLO, max_gpus=3)
    assert unpriced[0]["per_dollar"] is None
    assert unpriced[0]["per_gpu"] == max(r["per_gpu"] for r in unpriced)
    assert unpriced[0]["prefill_type"] == "fast"


def test_plan_for_a_target_rate_is_the_least_cost_per_hour_that_sustains_it():
    rows = plan(gpu_type_pair(), WORK, SLO, max_gpus=4, target_rate=12.0)
    assert rows and all(r["max_rate"] >= 12.0 for r in rows)
    assert rows[0]["cost_per_hour"] == min(r["cost_per_hour"] for r in rows)
    assert rows[0]["attainment_at_target"] >= 0.9
    # Two fast prefill instances (10 req/s each) and one cheap decode: $9 an hour.
    assert (rows[0]["prefill_type"], rows[0]["prefill"]) == ("fast", 2)
    assert (rows[0]["decode_type"], rows[0]["cost_per_hour"]) == ("cheap", 9.0)


def test_cli_plan_over_gpu_types_priced_by_flags_or_the_config(tmp_path, capsys):
    import json

    from deploy.cli import main

    for name, profile in (("fast", FAST), ("cheap", CHEAP)):
        (tmp_path / f"{name}.json").write_text(json.dumps(profile))
    common = ["plan", "--max-gpus", "3", "--input-len", "100", "--output-len", "20"]
    common += ["--range-ratio", "0", "--num-requests", "200", "--min-duration-s", "20"]
    common += ["--profile", f"fast={tmp_path / 'fast.json'}"]
    common += ["--profile", f"cheap={tmp_path / 'cheap.json'}"]
    out = tmp_path / "plan.json"
    assert main([*common, "--cost", "fast=4", "--cost", "cheap=1", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "(fast / cheap)" in printed and "per 1000 requests" in printed
    chosen = json.loads(out.read_text())["plan"]
    assert (chosen["prefill_type"], chosen["decode_type"]) == ("fast", "cheap")
    # The same prices from a deployment config's pools.
    config = tmp_path / "baton.yaml"
    config.write_text(
        "tiers:\n  small:\n    model: /nonexistent\n"
        "pools:\n"
        "  - {tier: small, role: prefill, gpu_type: fast, cost_per_hour: 4.0}\n"
        "  - {tier: small, role: decode, gpu_type: cheap, cost_per_hour: 1.0}\n"
    )
    assert main([*common, "--config", str(config), "--output", str(out)]) == 0
    assert json.loads(out.read_text())["plan"] == chosen
    # Several profiles need their types named; a type given twice is refused.
    unnamed = ["--profile", str(tmp_path / "fast.json")]
    assert main([*common, *unnamed]) == 2
    assert "name each one's GPU type" in capsys.readouterr().out
    twice = ["--profile", f"fast={tmp_path / 'cheap.json'}"]
    assert main([*common, *twice]) == 2
    assert "given twice" in capsys.readouterr().out


def test_prefill_step_scale_prices_fresh_and_continued_steps_apart():
    model = step_model(budget=1000, fixed=0.0, per_pair=1e-6)
    model.prefill_step_scale = {"fresh": 0.5, "continued": 2.0}
    first = 1000 * 1000 * 1e-6 * 0.5  # fresh
    second = (500 * 1500 + 200 * 200) * 1e-6 * 2.0  # holds a continued chunk
    assert finish_times(model, [1500, 200]) == pytest.approx([first + second] * 2)


def test_slower_continued_steps_lower_the_attainment_at_the_knee():
    """Prompts longer than the budget: every step holds a continued chunk, so their scale is
    what a loaded prefill worker runs at."""
    work = Workload(input_len=1500, output_len=4, range_ratio=0.5, num_requests=300)
    base = step_model(budget=1000, fixed=0.01)
    knee = max_rate(base, 1, 1, work, (1.0, 0.1))
    slower = step_model(budget=1000, fixed=0.01)
    slower.prefill_step_scale = {"fresh": 1.0, "continued": 1.1}
    assert max_rate(slower, 1, 1, work, (1.0, 0.1)) < 0.97 * knee
    assert simulate(slower, 1, 1, knee, work, (1.0, 0.1)) < simulate(
        base, 1, 1, knee, work, (1.0, 0.1)
    )


def test_profiles_carry_the_step_scale(tmp_path):
    from router.latency_model import load_profile

    coefs = {"prefill": [0, 1e-3, 0], "decode": [0, 0, 0], "transfer": [0, 0, 0]}
    path = tmp_path / "p.json"
    path.write_text(json.dumps({**coefs, "prefill_step_scale": {"continued": 1.08}}))
    model = new_instance_model(load_profile(path))
    assert model.prefill_step_scale == {"fresh": 1.0, "continued": 1.08}
    assert new_instance_model(coefs).prefill_step_scale == {"fresh": 1.0, "continued": 1.0}
    for bad in ({"decode": 1.1}, {"fresh": 0}, [1.1]):
        path.write_text(json.dumps({**coefs, "prefill_step_scale": bad}))
        with pytest.raises(ValueError, match="prefill_step_scale"):
            load_profile(path)
