"""The prefill worker's step log, and the report that compares it with a latency model."""

from __future__ import annotations

import threading

import pytest

from benchmarks.step_report import format_summary, summarize_steps
from engine import SamplingParams
from kvtransfer import start_store
from prefill_worker.worker import PrefillWorker, StepRecord
from router.latency_model import new_instance_model

MODEL = new_instance_model(
    {
        "prefill": [0.01, 1e-4, 0.0],
        "decode": [0, 0, 0],
        "transfer": [0, 0, 0],
        "max_num_batched_tokens": 1000,
    }
)


def test_summary_of_constructed_steps():
    records = [
        # end, seconds, seqs, tokens, pairs, context, backlog
        StepRecord(1.00, 0.02, 1, 100, 10_000, 100, 2),  # fresh, as predicted (0.01 + 0.01)
        StepRecord(1.13, 0.12, 2, 500, 50_000, 600, 1),  # a continued chunk: 2x the model
        StepRecord(1.16, 0.02, 1, 100, 10_000, 100, 0),  # 10 ms after the previous step
        StepRecord(2.00, 0.02, 1, 100, 10_000, 100, 0),  # idle before it: not a gap
        StepRecord(2.10, 0.001, 1, 0, 0, 50, 0),  # a decode-only step: not counted
    ]
    s = summarize_steps(records, MODEL)
    assert s["num_steps"] == 4
    assert s["seqs_per_step"] == pytest.approx(1.25)
    assert s["budget_fill"] == pytest.approx(200 / 1000)
    assert s["busy"] == pytest.approx(0.18 / 1.02)
    assert s["fresh_steps"] == 3 and s["fresh_measured_over_predicted"] == pytest.approx(1.0)
    assert s["continued_steps"] == 1
    assert s["continued_measured_over_predicted"] == pytest.approx(2.0)
    assert s["gap_ms"] == pytest.approx(10.0)  # 1.13 - 0.12 - 1.00 and 1.16 - 0.02 - 1.13
    assert "4 prefill steps" in format_summary(s)
    assert summarize_steps(records[-1:], MODEL) == {"num_steps": 0}


@pytest.mark.timeout(60)
def test_prefill_worker_logs_its_steps_and_times_a_call_from_its_arrival(model_dir):
    """Two prompts that fit the budget together run in one step; with no decode peer the
    transfers fail at once, and the calls still answer with their first tokens."""
    store, port = start_store()
    engine_args = {"model": str(model_dir), "device": "cpu", "max_num_batched_tokens": 256}
    worker = PrefillWorker("p", engine_args, "127.0.0.1", port)
    try:
        params = SamplingParams(max_tokens=8, temperature=0.0)
        block = threading.Event()
        # Hold the engine loop so that both calls are queued before the next step.
        worker.loop.submit(lambda engine: block.wait(10))
        results = {}

        def call(i):
            results[i] = worker.prefill(f"r{i}", i, [5 + i] * 40, params, "nobody")

        threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        threading.Timer(0.3, block.set).start()
        for t in threads:
            t.join(20)
        steps = worker.take_step_log()
        assert [(s.num_seqs, s.num_prefill_tokens) for s in steps] == [(2, 80)]
        assert steps[0].backlog == 0 and steps[0].num_context_tokens == 80
        assert worker.take_step_log() == []
        for result in results.values():
            assert result.transfer == "failed"
            # From the call's arrival: the 0.3 s the loop was held count.
            assert result.prefill_ms >= 150
    finally:
        worker.shutdown()
        del store


def test_fit_step_scales_per_kind_of_step():
    from router.latency_model import MIN_SCALE_STEPS, fit_step_scales

    fresh = StepRecord(1.0, 0.018, 1, 100, 10_000, 100, 0)  # 0.9x the model's 20 ms
    continued = StepRecord(1.0, 0.066, 2, 500, 50_000, 600, 0)  # 1.1x its 60 ms
    decode = StepRecord(1.0, 0.5, 1, 0, 0, 50, 0)  # not a prefill step
    scales = fit_step_scales([fresh] * MIN_SCALE_STEPS + [continued] * 25 + [decode], MODEL)
    assert scales == {"fresh": pytest.approx(0.9), "continued": pytest.approx(1.1)}
    # Too few of a kind to tell: it keeps 1.0.
    few = fit_step_scales([fresh] * 3 + [continued] * 25, MODEL)
    assert few == {"fresh": 1.0, "continued": pytest.approx(1.1)}
