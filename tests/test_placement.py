"""Placement policies decide as they should on constructed states; latency models fit."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.metrics import EngineMetrics
from engine.scheduler import ScheduledRequest, SchedulerOutput
from kvtransfer import TransferState
from prefill_worker.worker import _SendConnector
from router.latency_model import LinearModel, new_instance_model, prefill_pairs
from router.placement import (
    GoodputPlacement,
    LeastLoaded,
    Overloaded,
    PlacementInfo,
    RoundRobin,
)
from router.workers import Worker


def workers(num_prefill=2, num_decode=2):
    ws = [Worker(f"p{i}", "prefill", "t", client=None) for i in range(num_prefill)]
    return ws + [Worker(f"d{i}", "decode", "t", client=None) for i in range(num_decode)]


def info(prompt, max_tokens=16, ttft=1.0, tpot=0.1):
    return PlacementInfo(
        "t", list(prompt), max_tokens, ttft, tpot, block_size=16, kv_bytes_per_token=1024
    )


def test_linear_model_recovers_coefficients():
    model = LinearModel(np.zeros(3))
    rng = np.random.default_rng(0)
    for _ in range(200):
        x1, x2 = rng.integers(1, 500), rng.integers(1, 50000)
        model.add(x1, x2, 0.002 + 1e-4 * x1 + 3e-8 * x2)
    assert model.coef == pytest.approx([0.002, 1e-4, 3e-8], rel=1e-3)
    assert model.predict(100, 1000) == pytest.approx(0.002 + 0.01 + 3e-5, rel=1e-3)


def test_linear_model_never_goes_negative():
    model = LinearModel(np.zeros(3))
    for i in range(1, 50):
        model.add(i, 0, 0.01)  # time independent of x1: no negative slope appears
    assert (model.coef >= 0).all() and model.predict(10, 0) == pytest.approx(0.01, rel=1e-2)


def test_a_profile_holds_where_live_samples_cannot_tell_the_terms_apart():
    """Under load a prefill worker's steps all fill the token budget: intercept and slope are
    then one direction, and the profile must decide it (an 8B-on-H100-like profile here)."""
    profile = {"prefill": [6e-3, 2.2e-5, 0.0], "decode": [1e-3, 1e-4, 0.0], "transfer": [0, 0, 0]}
    model = new_instance_model(profile)
    for _ in range(16):  # live steps run 10% slower than profiled, all of 2048 tokens
        model.add_sample("prefill", 2048, 2048 * 2048, 1.1 * (6e-3 + 2.2e-5 * 2048))
    assert model.prefill.num_samples == 16
    assert model.prefill_time(2048, 2048) == pytest.approx(1.1 * (6e-3 + 2.2e-5 * 2048), rel=0.03)
    # A short suffix after a cached prefix: near the profile's 8.8 ms, not half the big step's.
    assert model.prefill_time(128, 128) == pytest.approx(6e-3 + 2.2e-5 * 128, rel=0.3)
    # Samples that do tell the terms apart win over a profile 25% off.
    model = new_instance_model({**profile, "prefill": [4.5e-3, 1.7e-5, 0.0]})
    rng = np.random.default_rng(0)
    for _ in range(256):
        tokens = int(rng.integers(16, 2048))
        model.add_sample("prefill", tokens, tokens * tokens, 6e-3 + 2.2e-5 * tokens)
    for tokens in (128, 2048):
        assert model.prefill_time(tokens, tokens) == pytest.approx(6e-3 + 2.2e-5 * tokens, rel=0.07)


def test_prefill_feature_is_the_one_the_engine_measures(model_dir):
    """Samples come from the engine's steps; predictions must build the same features."""
    engine = LLMEngine(EngineConfig(model=str(model_dir), num_blocks=64))
    prefix = list(range(3, 35))  # two full blocks, cached after the first request
    params = SamplingParams(max_tokens=1)
    for rid, prompt in (("a", prefix + [40] * 16), ("b", prefix + [50] * 40)):
        engine.add_request(rid, prompt, params)
        while engine.has_unfinished_requests():
            engine.step()
    step = engine.last_step
    assert step.num_prefill_tokens == 40  # the 32 cached tokens were not computed again
    assert step.attention_pairs == prefill_pairs(40, 72)


def test_round_robin_and_least_loaded():
    ws = workers()
    rr = RoundRobin()
    picks = [rr.choose(ws, info([1] * 8)) for _ in range(4)]
    assert [p.worker_id for p, _ in picks] == ["p0", "p1", "p0", "p1"]
    ws[0].requests.update({"a", "b"})
    ws[3].requests.add("c")
    p, d = LeastLoaded().choose(ws, info([1] * 8))
    assert (p.worker_id, d.worker_id) == ("p1", "d0")


def test_goodput_prefers_the_prefill_instance_holding_the_prefix():
    ws = workers()
    policy = GoodputPlacement()
    shared = list(range(3, 3 + 320))
    first = info(shared + [7] * 8)
    # p1 served a request with this prefix before: its cache holds the 20 shared blocks.
    policy.on_placed(ws[1], ws[2], first, "w1")
    policy.on_prefill_done(ws[1], first, "w1", ttft_s=0.05)
    policy.on_finished(ws[1], ws[2], "w1")
    second = info(shared + [9] * 8)
    assert policy.cached_tokens(ws[1], second) == 320 and policy.cached_tokens(ws[0], second) == 0
    prefill, _ = policy.choose(ws, second)
    assert prefill.worker_id == "p1"


def test_goodput_avoids_a_queued_prefill_instance():
    ws = workers()
    policy = GoodputPlacement()
    for i in range(4):  # p0 has four long prompts queued
        policy.on_placed(ws[0], ws[2], info([5 + i] * 1000), f"q{i}")
    fresh = info([2] * 100)  # shares no prefix with the queued prompts
    assert policy.predict_ttft(ws[0], fresh) > policy.predict_ttft(ws[1], fresh)
    prefill, _ = policy.choose(ws, fresh)
    assert prefill.worker_id == "p1"


def test_goodput_follows_a_prefix_into_a_queue_while_the_slo_allows():
    ws = workers()
    policy = GoodputPlacement()
    policy.on_placed(ws[0], ws[2], info([7] * 1000), "q0")  # p0 is busy with this prefix
    same_prefix = info([7] * 1000 + [3] * 10)
    prefill, _ = policy.choose(ws, same_prefix)
    assert prefill.worker_id == "p0"  # reusing 1000 cached tokens beats an idle instance
    strict = info([7] * 1000 + [3] * 10, ttft=1e-4)  # unless nothing meets the SLO
    prefill, _ = policy.choose(ws, strict)
    assert prefill.worker_id == "p1"


def test_goodput_decode_headroom_and_free_blocks():
    ws = workers()
    policy = GoodputPlacement()
    for i in range(8):  # d0 runs a big batch
        policy.on_placed(ws[0], ws[2], info([4] * 500), f"r{i}")
    _, decode = policy.choose(ws, info([8] * 100))
    assert decode.worker_id == "d1"
    policy.observe_stats(ws[3], {"num_free_blocks": 2, "num_blocks": 100})  # d1 is full
    _, decode = policy.choose(ws, info([8] * 100))
    assert decode.worker_id == "d0"


def test_overload_policy_reject_or_queue():
    ws = workers(1, 1)
    tight = info([8] * 100, tpot=1e-6)  # no decode step is this fast
    with pytest.raises(Overloaded):
        GoodputPlacement("reject").choose(ws, tight)
    prefill, decode = GoodputPlacement("queue").choose(ws, tight)
    assert (prefill.worker_id, decode.worker_id) == ("p0", "d0")


def test_goodput_learns_from_samples():
    ws = workers(1, 1)
    policy = GoodputPlacement()
    samples = [("decode", b, 100 * b, 0.001 + 0.004 * b) for b in range(1, 40)]
    policy.observe_samples(ws[1], samples)
    for i in range(10):
        policy.on_placed(ws[0], ws[1], info([3] * 100), f"r{i}")
    assert policy.predict_step(ws[1], info([3] * 100)) == pytest.approx(
        0.001 + 0.004 * 11, rel=0.05
    )


def test_prefill_step_does_not_wait_for_its_sends():
    """The layers are in the send buffers when the forward pass ends: the step returns at once,
    the outcome comes from the sends thread; past MAX_SENDS_IN_FLIGHT the step waits."""
    from prefill_worker import worker as prefill_worker

    sent = []
    kv = SimpleNamespace(live_block_ids=lambda request, n: [0])
    connector = _SendConnector(
        _SlowSendAgent(tail_s=0.3), EngineMetrics("t", "prefill", "p0"), 1000, kv,
        on_sent=lambda rid, state: sent.append((rid, state)),
    )  # fmt: skip
    request = SimpleNamespace(request_id="r", num_computed_tokens=0, num_tokens=8)
    sched = SchedulerOutput([ScheduledRequest(request, 8, [0])])
    connector.targets["r"] = (1, "d0")
    assert connector.on_step_start(sched)
    start = time.monotonic()
    connector.on_step_end(sched)
    assert time.monotonic() - start < 0.1 and connector.sending == {"r"} and not sent
    assert connector.wait_idle()
    assert sent == [("r", TransferState.DONE)] and not connector.sending
    # Backpressure: with every slot taken, the next step's end waits for one to free.
    for _ in range(prefill_worker.MAX_SENDS_IN_FLIGHT):
        connector._slots.acquire()
    connector.targets["r"] = (2, "d0")
    assert connector.on_step_start(sched)
    threading.Timer(0.2, connector._slots.release).start()
    start = time.monotonic()
    connector.on_step_end(sched)
    assert time.monotonic() - start >= 0.15


class _SlowSendAgent:
    """Sends take `tail_s` to finish once the forward pass is over."""

    def __init__(self, tail_s: float):
        self.tail_s = tail_s

    def start_send(self, transfer_id, peer, block_ids):
        return object()

    def send_layer(self, handle, layer_idx):
        pass

    def finish_send(self, handle):
        time.sleep(self.tail_s)
        return TransferState.DONE


def test_transfer_sample_is_what_the_transfer_adds_after_the_forward_pass():
    """The router's TTFT model adds the transfer to the prefill step; a sample timed from the
    transfer's start would count the forward pass twice."""
    metrics = EngineMetrics("t", "prefill", "p0")
    kv = SimpleNamespace(live_block_ids=lambda request, n: [0, 1])
    connector = _SendConnector(_SlowSendAgent(tail_s=0.01), metrics, 1000, kv)
    request = SimpleNamespace(request_id="r", num_computed_tokens=0, num_tokens=32)
    sched = SchedulerOutput([ScheduledRequest(request, 32, [0, 1])])
    connector.targets["r"] = (1, "d0")
    assert connector.on_step_start(sched)
    connector.on_layer_done(0)
    time.sleep(0.1)  # the forward pass
    connector.on_step_end(sched)  # returns at once: a thread waits for the sends
    assert connector.wait_idle()
    [(kind, num_bytes, _, seconds)] = metrics.take_samples()
    assert (kind, num_bytes) == ("transfer", 2000)
    assert 0.01 <= seconds < 0.08
    # The histogram keeps the whole span, start to all sent; the exposed one the tail alone.
    assert metrics.transfer_time._sum.get() >= 0.11
    assert 0.01 <= metrics.transfer_exposed._sum.get() < 0.08


def test_live_profile_averages_the_fitted_models_and_carries_the_request_overhead():
    ws = workers()
    profile = {
        "prefill": [0.01, 1e-4, 0.0],
        "decode": [0.002, 1e-4, 0.0],
        "transfer": [1e-3, 1e-9, 0.0],
        "request_overhead_s": 0.5,  # a profile's overhead seeds the model until measured
    }
    policy = GoodputPlacement(profiles={"t": profile})
    assert policy._p(ws[0]).model.request_overhead == 0.5
    # p0 measures 40 ms of step fixed cost; p1 keeps the profile's 10 ms.
    policy.observe_samples(ws[0], [("prefill", n, n * n, 0.04 + 1e-4 * n) for n in range(1, 17)])
    for k, overhead in enumerate((0.030, 0.010, 0.900, 0.020)):  # p0: one request retried late
        policy.on_placed(ws[0], ws[2], info([1] * 32), f"w{k}")
        policy.on_prefill_done(ws[0], info([1] * 32), f"w{k}", ttft_s=0.1, overhead_s=overhead)
    policy.on_prefill_done(ws[1], info([1] * 32), "x", ttft_s=0.1, overhead_s=0.010)
    policy.on_prefill_done(ws[1], info([1] * 32), "y", ttft_s=0.1)  # a retry: not measured
    live = policy.live_profile(ws, "t")
    p0, p1 = (policy._p(w).model for w in ws[:2])
    assert p0.request_overhead == pytest.approx(0.025)  # the median: the outlier does not count
    assert p1.request_overhead == pytest.approx(0.010)
    assert live["request_overhead_s"] == pytest.approx(0.0175)
    assert live["prefill"] == pytest.approx(list((p0.prefill.coef + p1.prefill.coef) / 2))
    assert live["prefill"][0] == pytest.approx(0.025, rel=0.1)
    assert live["decode"] == pytest.approx(profile["decode"])
    assert live["num_samples"] == {"prefill": 16, "decode": 0}
    loaded = new_instance_model(live)  # what `baton plan` and the planner take
    assert loaded.request_overhead == pytest.approx(0.0175)
    with pytest.raises(ValueError):
        policy.live_profile(ws[:2], "t")  # no decode instance


def test_a_prefill_step_of_several_chunks_is_predicted_on_its_totals():
    model = new_instance_model(
        {"prefill": [0.01, 1e-4, 1e-8], "decode": [0, 0, 0], "transfer": [0, 0, 0]}
    )
    chunks = [(300, 300), (200, 700)]  # a fresh prompt, and a chunk over 500 cached tokens
    pairs = prefill_pairs(300, 300) + prefill_pairs(200, 700)
    assert model.prefill_step_time(chunks) == pytest.approx(0.01 + 1e-4 * 500 + 1e-8 * pairs)
    assert model.prefill_step_time([(300, 300)]) == pytest.approx(model.prefill_time(300, 300))
