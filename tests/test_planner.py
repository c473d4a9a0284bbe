"""The planner's simulation behaves like a queueing system should, and the search uses it."""

from __future__ import annotations

from deploy.planner import Workload, max_rate, plan, simulate
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
